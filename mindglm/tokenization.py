"""The three GLM tokenizers over sentencepiece (no `transformers` needed).

Every family is a thin layer over one `SentencePieceProcessor`:

- ChatGLM-6B (`ice_text.model`): newlines, tabs and runs of 2..80 spaces are rewritten to the
  user-defined pieces `<n>`, `<|tab|>`, `<|blank_N|>` before encoding (and back after decoding);
  the GLM control pieces (`[MASK]`, `[gMASK]`, `<sop>`, `<eop>`, ...) live inside the model file;
  `add_special_tokens` *appends* `[gMASK] <sop>`.
- ChatGLM2-6B (`tokenizer.model`): plain sentencepiece; `[MASK] [gMASK] [sMASK] sop eop` are
  numbered right after the sentencepiece vocabulary; `add_special_tokens` *prepends* `[gMASK] sop`.
- ChatGLM3-6B: ChatGLM2 plus the role tokens `<|system|> <|user|> <|assistant|> <|observation|>`.

Text typed by a user is always encoded as plain text: `"<|user|>"` or `"[gMASK]"` inside a
string never becomes a special id (special ids come only from `get_command` / the chat
templates in `mindglm.chat`). Ids are identical to THUDM's tokenizers for such text.

`load_tokenizer(path)` picks the family from a model directory or a tokenizer file.
"""
from __future__ import annotations

import functools
import json
import os
import re
import warnings
from typing import Iterable, Optional, Sequence

import numpy as np
import sentencepiece as spm

from mindglm.config import FAMILIES, TOKENIZER_FILES, ConfigError
from mindglm.positions import PREFER_MASK, glm_2d_positions, left_pad, positions_from_padding



# transformers' `clean_up_tokenization` (tokenization_utils_base.py), in its order: what `decode()`
# does to a text when `clean_up_tokenization_spaces` is on.
_CLEAN_UP_REPLACEMENTS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def clean_up_tokenization(text: str) -> str:
    """Remove the space before punctuation and English contractions, as transformers does."""
    for before, after in _CLEAN_UP_REPLACEMENTS:
        text = text.replace(before, after)
    return text


class TokenizerError(ConfigError):
    """A tokenizer file or option a user can fix: the message names the path and the fix."""


def _load_sentencepiece(vocab_file: str) -> spm.SentencePieceProcessor:
    """Load a sentencepiece model, turning every failure into one TokenizerError."""
    if not os.path.isfile(vocab_file):
        raise TokenizerError(f"tokenizer file {vocab_file!r} does not exist: pass the model directory "
                             "or the path of its ice_text.model (ChatGLM-6B) / tokenizer.model (ChatGLM2/3)")
    with open(vocab_file, "rb") as handle:
        head = handle.read(64)
    if not head:
        raise TokenizerError(f"{vocab_file!r} is an empty file, not a sentencepiece model: re-download "
                             "ice_text.model / tokenizer.model from the THUDM model repository")
    if head.startswith(b"version https://git-lfs"):
        raise TokenizerError(f"{vocab_file!r} is a git-lfs pointer, not the tokenizer itself: "
                             "run `git lfs pull` in the model repository or download the real file")
    processor = spm.SentencePieceProcessor()
    try:
        processor.Load(vocab_file)
    except Exception as err:  # sentencepiece raises RuntimeError/OSError with C++ messages
        raise TokenizerError(f"{vocab_file!r} is not a sentencepiece model ({err}); re-download "
                             "ice_text.model / tokenizer.model from the THUDM model repository") from None
    return processor


class GLMTokenizer:
    """What the three families share: sentencepiece loading, id lookups, batching with left padding.

    Subclasses define `encode`, `_decode`, `special_tokens` (name -> id) and `_position_ids`.
    """

    family = ""
    # THUDM's ChatGLM-6B tokenizer runs under transformers' default clean_up_tokenization_spaces=True
    # (it pins transformers 4.27); ChatGLM2/3's tokenizer_config.json sets it to False.
    CLEAN_UP_TOKENIZATION_SPACES = False
    _id_offset = 0  # ChatGLM-6B's num_image_tokens
    _appended_names: dict = {}  # ChatGLM2/3: special ids numbered after the sentencepiece pieces

    def __init__(self, vocab_file: str):
        self.vocab_file = os.fspath(vocab_file)
        self.sp = _load_sentencepiece(self.vocab_file)
        self.special_tokens: dict[str, int] = {}

    # ------------------------------------------------------------------ lookups
    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (the model's embedding may be padded beyond it)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.vocab_size

    def get_command(self, name: str) -> int:
        """Id of a special token by name, e.g. `"[gMASK]"`, `"<|user|>"`, `"<eos>"`."""
        try:
            return self.special_tokens[name]
        except KeyError:
            raise TokenizerError(f"{name!r} is not a special token of {self.family}; "
                                 f"known: {sorted(self.special_tokens)}") from None

    def convert_token_to_id(self, token: str) -> int:
        """Id of a special token name or of a sentencepiece piece (e.g. `"▁hello"`)."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        piece_id = self.sp.piece_to_id(token)
        if piece_id == self.sp.unk_id() and token != self.sp.id_to_piece(self.sp.unk_id()):
            raise TokenizerError(f"{token!r} is neither a piece nor a special token of {self.family}")
        return piece_id + self._id_offset

    def convert_id_to_token(self, token_id: int) -> str:
        """Piece of an id, or the name of a special token numbered after the sentencepiece pieces."""
        if token_id in self._appended_names:
            return self._appended_names[token_id]
        piece_id = int(token_id) - self._id_offset
        if not 0 <= piece_id < self.sp.get_piece_size():
            raise TokenizerError(f"id {token_id} is outside the {self.family} vocabulary (size {self.vocab_size})")
        return self.sp.id_to_piece(piece_id)

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        """Token ids of `text`; with `add_special_tokens` the family's GLM prefix/suffix is added."""
        raise NotImplementedError

    def encode_plain(self, text: str) -> list:
        """Ids of `text` alone, without special tokens (what the chat templates concatenate)."""
        return self.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: Optional[bool] = None) -> str:
        """Text of `ids`, as the reference tokenizer's `decode` returns it.

        clean_up_tokenization_spaces: None takes the family's reference setting (ChatGLM-6B on,
        ChatGLM2/3 off); on, " ." " ," " !" " ?" " 's" " n't" ... lose their space.
        """
        text = self._decode(ids, skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.CLEAN_UP_TOKENIZATION_SPACES
        return clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def _decode(self, ids: Iterable[int], skip_special_tokens: bool) -> str:
        raise NotImplementedError

    def _position_ids(self, sequences: Sequence[Sequence[int]], attention_mask: np.ndarray) -> np.ndarray:
        """Position ids of the left-padded batch of `sequences` (0 on padding)."""
        raise NotImplementedError

    def batch_encode(self, texts: Sequence[str], pad_to_multiple_of: Optional[int] = None,
                     add_special_tokens: bool = True, pad_to_length: Optional[int] = None) -> dict:
        """Encode several texts and left-pad them into numpy arrays (see `pad_batch`)."""
        if isinstance(texts, str):
            raise TypeError("batch_encode takes a list of texts; use encode() for a single string")
        return self.pad_batch([self.encode(text, add_special_tokens) for text in texts],
                              pad_to_multiple_of=pad_to_multiple_of, pad_to_length=pad_to_length)

    def pad_batch(self, sequences: Sequence[Sequence[int]], pad_to_multiple_of: Optional[int] = None,
                  pad_to_length: Optional[int] = None) -> dict:
        """Left-pad already encoded sequences (e.g. chat prompts) like the reference tokenizer's `_pad`.

        Returns int64 arrays: `input_ids` [B, L] padded with `pad_token_id`; `attention_mask` [B, L]
        (1 on tokens, 0 on padding); `position_ids` [B, L] for ChatGLM2/3 (0 on padding, then
        0..n-1) or [B, 2, L] for ChatGLM-6B (rows: position, block position; 0 on padding).
        The length is the longest sequence, or `pad_to_length`, rounded up to `pad_to_multiple_of`.
        ChatGLM-6B's reference also returns a [1, L, L] boolean mask (causal, the context before
        `<sop>` fully visible, padding blocked); that mask is left to the model, which builds it
        from `input_ids` and this padding mask.
        """
        if len(sequences) == 0:
            raise TokenizerError("pad_batch/batch_encode got an empty batch: pass at least one text")
        lengths = [len(seq) for seq in sequences]
        target = max(lengths)
        if pad_to_length is not None:
            if pad_to_length < target:
                raise TokenizerError(f"a sequence has {target} tokens, more than pad_to_length={pad_to_length}: "
                                     "shorten the prompt or raise pad_to_length")
            target = pad_to_length
        if pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        input_ids, attention_mask = left_pad(sequences, self.pad_token_id, target)
        position_ids = self._position_ids(sequences, attention_mask)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_file={self.vocab_file!r}, vocab_size={self.vocab_size})"


class ChatGLMTokenizer(GLMTokenizer):
    """ChatGLM-6B (GLM v1) tokenizer over `ice_text.model`.

    `num_image_tokens` shifts every id (the first chatglm-6b release reserved 20000 image ids;
    the current ice_text.model and tokenizer_config.json use 0). `remove_space` collapses runs of
    whitespace and strips the text; `do_lower_case` lower-cases it (both off in THUDM's config).
    """

    family = "chatglm"
    CLEAN_UP_TOKENIZATION_SPACES = True
    CONTROL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
    NAMED_PIECES = ("<unk>", "<s>", "</s>", "<pad>")
    LINEBREAK = "<n>"
    TAB = "<|tab|>"

    def __init__(self, vocab_file: str, num_image_tokens: int = 0, remove_space: bool = False,
                 do_lower_case: bool = False, max_blank_length: int = 80):
        super().__init__(vocab_file)
        self._id_offset = int(num_image_tokens)
        self.remove_space = remove_space
        self.do_lower_case = do_lower_case
        self.max_blank_length = max_blank_length
        for name in self.CONTROL_TOKENS + self.NAMED_PIECES + (self.LINEBREAK, self.TAB):
            piece_id = self.sp.piece_to_id(name)
            if name != "<unk>" and piece_id == self.sp.unk_id():
                raise TokenizerError(f"{self.vocab_file!r} has no {name!r} piece, so it is not ChatGLM-6B's "
                                     "ice_text.model; for a ChatGLM2/3 tokenizer.model pass family='chatglm2' "
                                     "or 'chatglm3'")
            if name in self.CONTROL_TOKENS or name in self.NAMED_PIECES:
                self.special_tokens[name] = piece_id + self._id_offset
        self.special_tokens["<bos>"] = self.special_tokens["<sop>"]
        self.special_tokens["<eos>"] = self.special_tokens["<eop>"]
        self.mask_token_id = self.special_tokens["[MASK]"]
        self.gmask_token_id = self.special_tokens["[gMASK]"]
        self.sop_token_id = self.bos_token_id = self.special_tokens["<sop>"]
        self.eos_token_id = self.special_tokens["<eop>"]
        self.pad_token_id = self.special_tokens["<pad>"]
        self.unk_token_id = self.special_tokens["<unk>"]
        self._blank_tokens = {n: f"<|blank_{n}|>" for n in range(2, max_blank_length + 1)}
        self._whitespace_run = re.compile(" {2,}")
        # Decoding maps the whitespace pieces back; unknown blank sizes stay as they are, like the reference.
        self._decode_map = {self.LINEBREAK: "\n", self.TAB: "\t"}
        self._decode_map.update({token: " " * n for n, token in self._blank_tokens.items()})
        self._decode_pattern = re.compile(r"<n>|<\|tab\|>|<\|blank_\d+\|>")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size() + self._id_offset

    @functools.cached_property
    def _control_ids(self) -> frozenset:
        """Every control/unknown piece id: what `skip_special_tokens=True` removes."""
        every_id = list(range(self.sp.get_piece_size()))
        flags = zip(every_id, self.sp.is_control(every_id), self.sp.is_unknown(every_id))
        return frozenset(i + self._id_offset for i, control, unknown in flags if control or unknown)

    def _encode_blanks(self, match: "re.Match") -> str:
        # The reference replaces runs of 80, then 79, ... 2 spaces: a run of n spaces becomes
        # n // 80 `<|blank_80|>` pieces followed by the remainder (a single space stays a space).
        whole, rest = divmod(len(match.group()), self.max_blank_length)
        tail = self._blank_tokens[rest] if rest >= 2 else " " * rest
        return self._blank_tokens[self.max_blank_length] * whole + tail

    def preprocess(self, text: str) -> str:
        """The text sentencepiece actually sees: options applied, whitespace rewritten to pieces."""
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        text = text.replace("\n", self.LINEBREAK).replace("\t", self.TAB)
        if "  " in text:
            text = self._whitespace_run.sub(self._encode_blanks, text)
        return text

    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        """Token ids of `text`; `add_special_tokens` appends `[gMASK] <sop>` as the reference does."""
        ids = self.sp.encode(self.preprocess(text))
        if self._id_offset:
            ids = [i + self._id_offset for i in ids]
        if add_special_tokens:
            ids += [self.gmask_token_id, self.sop_token_id]
        return ids

    def _decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Control pieces (`[gMASK]`, `<sop>`, `<eop>`, ...) decode to nothing either way;
        `<pad>` ids are removed as in the reference; ids outside the vocabulary are ignored;
        `skip_special_tokens=True` also drops `<unk>` (otherwise shown as ` ⁇ `)."""
        offset, size = self._id_offset, self.sp.get_piece_size()
        drop = self._control_ids if skip_special_tokens else (self.pad_token_id,)
        pieces = [i - offset for i in map(int, ids) if i not in drop and 0 <= i - offset < size]
        text = self.sp.decode(pieces)
        if "<" in text:
            text = self._decode_pattern.sub(lambda m: self._decode_map.get(m.group(), m.group()), text)
        return text

    def _position_ids(self, sequences, attention_mask) -> np.ndarray:
        # As THUDM's tokenizer `_pad` builds them: [MASK] decides when a prompt holds both mask tokens
        # (the model itself prefers [gMASK]: see mindglm.positions).
        positions = np.zeros((len(sequences), 2, attention_mask.shape[1]), np.int64)
        for row, seq in enumerate(sequences):
            if len(seq):
                positions[row, :, -len(seq):] = glm_2d_positions(
                    seq, self.sop_token_id, self.mask_token_id, self.gmask_token_id, PREFER_MASK)[0]
        return positions


class ChatGLM2Tokenizer(GLMTokenizer):
    """ChatGLM2-6B tokenizer over `tokenizer.model`; base class of the ChatGLM3 tokenizer.

    Special tokens are numbered right after the sentencepiece vocabulary, in `SPECIAL_TOKENS`
    order. `<pad>` is sentencepiece's `<unk>` (id 0), `<eos>` is `</s>`, as in the reference.
    """

    family = "chatglm2"
    SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
    # ChatGLM2 decodes special ids to nothing; ChatGLM3 writes their names into the text.
    DECODE_SPECIAL_NAMES = False

    def __init__(self, vocab_file: str):
        super().__init__(vocab_file)
        if self.sp.piece_to_id("[gMASK]") != self.sp.unk_id():
            raise TokenizerError(f"{self.vocab_file!r} is ChatGLM-6B's ice_text.model, not a ChatGLM2/3 "
                                 "tokenizer.model: pass family='chatglm'")
        base = self.sp.get_piece_size()
        self.special_tokens = {name: base + index for index, name in enumerate(self.SPECIAL_TOKENS)}
        self._appended_names = {token_id: name for name, token_id in self.special_tokens.items()}
        self.special_tokens.update({"<bos>": self.sp.bos_id(), "<eos>": self.sp.eos_id(), "<pad>": self.sp.unk_id()})
        self.mask_token_id = self.special_tokens["[MASK]"]
        self.gmask_token_id = self.special_tokens["[gMASK]"]
        self.sop_token_id = self.special_tokens["sop"]
        self.eos_token_id = self.sp.eos_id()
        self.pad_token_id = self.unk_token_id = self.sp.unk_id()
        # Ids the reference decodes to "" (<s>, </s>, <unk>/<pad>).
        self._silent_ids = frozenset({self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()})
        self._prefix = [self.gmask_token_id, self.sop_token_id]

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size() + len(self.SPECIAL_TOKENS)

    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        """Token ids of `text`; `add_special_tokens` prepends `[gMASK] sop` as the reference does."""
        ids = self.sp.encode(text)
        return self._prefix + ids if add_special_tokens else ids

    def _decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` as the reference `decode` returns it: `<s>`, `</s>`, `<unk>`/`<pad>` and ids
        outside the vocabulary vanish; special tokens vanish for ChatGLM2 and appear by name
        (`<|user|>`, `[gMASK]`, `sop`, ...) for ChatGLM3 unless `skip_special_tokens=True`."""
        size = self.sp.get_piece_size()
        ids = [int(i) for i in ids]
        show_names = self.DECODE_SPECIAL_NAMES and not skip_special_tokens
        if not show_names or not any(i in self._appended_names for i in ids):
            return self.sp.decode([i for i in ids if 0 <= i < size and i not in self._silent_ids])
        # Special names are not pieces: sentencepiece writes them literally, and the piece after one
        # keeps its leading space, exactly as the reference's DecodePieces over all tokens.
        pieces = []
        for i in ids:
            if i in self._appended_names:
                pieces.append(self._appended_names[i])
            elif 0 <= i < size and i not in self._silent_ids:
                pieces.append(self.sp.id_to_piece(i))
        return self.sp.decode_pieces(pieces)

    def _position_ids(self, sequences, attention_mask) -> np.ndarray:
        return positions_from_padding(attention_mask)


class ChatGLM3Tokenizer(ChatGLM2Tokenizer):
    """ChatGLM3-6B tokenizer: ChatGLM2 plus the role tokens used by its chat template."""

    family = "chatglm3"
    ROLES = ("system", "user", "assistant", "observation")
    SPECIAL_TOKENS = ChatGLM2Tokenizer.SPECIAL_TOKENS + tuple(f"<|{role}|>" for role in ROLES)
    DECODE_SPECIAL_NAMES = True

    def role_token_id(self, role: str) -> int:
        """Id of `<|role|>` for one of `ROLES`."""
        if role not in self.ROLES:
            raise TokenizerError(f"unknown ChatGLM3 role {role!r}; expected one of {self.ROLES}")
        return self.special_tokens[f"<|{role}|>"]


TOKENIZER_CLASSES = {"chatglm": ChatGLMTokenizer, "chatglm2": ChatGLM2Tokenizer, "chatglm3": ChatGLM3Tokenizer}


def _read_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, ValueError) as err:
        raise TokenizerError(f"{path!r} is not valid JSON ({err}): fix or remove the file") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{path!r} should hold a JSON object")
    return value


def _family_from_name(name: str) -> Optional[str]:
    name = name.lower()
    for family in ("chatglm3", "chatglm2"):
        if family in name:
            return family
    return "chatglm" if "chatglm-6b" in name or "chatglm_6b" in name else None


def infer_family(model_dir: str, vocab_file: Optional[str] = None) -> str:
    """Family of the tokenizer in `model_dir` (or of `vocab_file`).

    Order: config.json (ChatGLM-6B has `position_encoding_2d`; otherwise `_name_or_path` tells
    ChatGLM3 from ChatGLM2 exactly as `mindglm.config` decides for the model), then
    tokenizer_config.json's `name_or_path`, then the tokenizer itself: a file (under any name) by its
    pieces, a directory by its file names (`ice_text.model` is ChatGLM-6B). A bare ChatGLM2/3
    tokenizer with nothing else is ambiguous: ChatGLM3 is assumed, with a warning (its text ids equal ChatGLM2's; pass family='chatglm2' for ChatGLM2).
    """
    from mindglm.config import detect_family

    config = _read_json(os.path.join(model_dir, "config.json"))
    if config is not None:
        return detect_family(config)
    tokenizer_config = _read_json(os.path.join(model_dir, "tokenizer_config.json")) or {}
    hinted = _family_from_name(str(tokenizer_config.get("name_or_path", "")))
    if hinted:
        return hinted
    if vocab_file is not None:
        # A file under any name: its pieces tell ChatGLM-6B (GLM control pieces inside) from ChatGLM2/3.
        is_v1 = _load_sentencepiece(vocab_file).piece_to_id("[gMASK]") != 0
    else:
        names = os.listdir(model_dir)
        is_v1 = TOKENIZER_FILES["chatglm"] in names
        if not is_v1 and "tokenizer.model" not in names:
            raise TokenizerError(f"no ice_text.model or tokenizer.model in {model_dir!r}: point load_tokenizer at "
                                 "a ChatGLM model directory or at its tokenizer file")
    if is_v1:
        return "chatglm"
    warnings.warn(f"cannot tell ChatGLM2 from ChatGLM3 for {vocab_file or model_dir!r} (no config.json "
                  "or tokenizer_config.json next to it): assuming chatglm3; pass family='chatglm2' "
                  "for a ChatGLM2 model", stacklevel=3)
    return "chatglm3"



def load_tokenizer(path: str, family: Optional[str] = None) -> GLMTokenizer:
    """Load the tokenizer of a ChatGLM model directory, or a tokenizer file directly.

    `family` ("chatglm", "chatglm2", "chatglm3") overrides the detection done by `infer_family`.
    ChatGLM-6B options (`num_image_tokens`, `remove_space`, `do_lower_case`) are read from the
    directory's tokenizer_config.json when present. Every user error raises `TokenizerError`.
    """
    path = os.fspath(path)
    if family is not None and family not in FAMILIES:
        raise TokenizerError(f"unknown tokenizer family {family!r}; expected one of {FAMILIES}")
    if not os.path.exists(path):
        raise TokenizerError(f"tokenizer path {path!r} does not exist: pass a ChatGLM model directory "
                             "or its ice_text.model (ChatGLM-6B) / tokenizer.model (ChatGLM2/3) file")
    if os.path.isdir(path):
        model_dir, vocab_file = path, None
    else:
        model_dir, vocab_file = os.path.dirname(path) or ".", path
    family = family or infer_family(model_dir, vocab_file)
    if vocab_file is None:
        vocab_file = os.path.join(model_dir, TOKENIZER_FILES[family])
        if not os.path.isfile(vocab_file):
            raise TokenizerError(f"{family} model directory {model_dir!r} has no {TOKENIZER_FILES[family]}: "
                                 "copy the tokenizer file from the THUDM model repository into it")
    if family != "chatglm":
        return TOKENIZER_CLASSES[family](vocab_file)
    options = _read_json(os.path.join(model_dir, "tokenizer_config.json")) or {}
    return ChatGLMTokenizer(vocab_file, num_image_tokens=int(options.get("num_image_tokens", 0) or 0),
                            remove_space=bool(options.get("remove_space", False)),
                            do_lower_case=bool(options.get("do_lower_case", False)))
