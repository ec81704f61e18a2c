"""Tokenizers against THUDM's reference ids (tests/fixtures/tokenizers) and the e2e model dirs."""
import json
import os
import shutil
import warnings

import numpy as np
import pytest
import sentencepiece as spm

from mindglm.tokenization import (ChatGLM2Tokenizer, ChatGLM3Tokenizer, ChatGLMTokenizer, TokenizerError,
                                  load_tokenizer)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TOKENIZER_DIR = os.path.join(FIXTURES, "tokenizers")
VOCAB_FILES = {"chatglm": "ice_text.model", "chatglm2": "tokenizer.model", "chatglm3": "tokenizer.model"}
FAMILIES = tuple(VOCAB_FILES)


def read_cases(family, kind):
    with open(os.path.join(TOKENIZER_DIR, f"{family}_cases.jsonl"), encoding="utf-8") as handle:
        cases = [json.loads(line) for line in handle if line.strip()]
    return [case for case in cases if case["kind"] == kind]


def e2e_config(family):
    with open(os.path.join(FIXTURES, "chat", f"{family}-e2e", "config.json"), encoding="utf-8") as handle:
        return json.load(handle)


_TOKENIZERS = {}


def tokenizer_for(family):
    if family not in _TOKENIZERS:
        _TOKENIZERS[family] = load_tokenizer(os.path.join(TOKENIZER_DIR, VOCAB_FILES[family]), family=family)
    return _TOKENIZERS[family]


ENCODE_CASES = [(family, index, case) for family in FAMILIES
                for index, case in enumerate(read_cases(family, "encode"))]


@pytest.mark.parametrize("family,index,case", ENCODE_CASES, ids=[f"{f}-{i}" for f, i, _ in ENCODE_CASES])
def test_encode_decode_match_reference(family, index, case):
    tok = tokenizer_for(family)
    assert tok.encode(case["text"]) == case["ids"]
    assert tok.encode(case["text"], add_special_tokens=False) == case["ids_no_special"]
    assert tok.decode(case["ids_no_special"]) == case["decoded"]
    # Special tokens vanish with skip_special_tokens (and are silent anyway in ChatGLM-6B/2).
    assert tok.decode(case["ids"], skip_special_tokens=True) == case["decoded"]
    if family != "chatglm3":
        assert tok.decode(case["ids"]) == case["decoded"]


@pytest.mark.parametrize("family", FAMILIES)
def test_special_ids_agree_with_reference_ids_and_config(family):
    tok = tokenizer_for(family)
    config = e2e_config(family)
    with_special = read_cases(family, "encode")[0]["ids"]
    if family == "chatglm":
        # v1 appends [gMASK] <sop>; its config names the same ids.
        assert with_special[-2:] == [tok.gmask_token_id, tok.sop_token_id]
        assert tok.gmask_token_id == config["gmask_token_id"] == tok.get_command("[gMASK]")
        assert tok.mask_token_id == config["mask_token_id"] == tok.get_command("[MASK]")
        assert tok.bos_token_id == config["bos_token_id"] == tok.get_command("<sop>")
        assert tok.pad_token_id == config["pad_token_id"] == tok.get_command("<pad>")
        assert tok.vocab_size <= config["vocab_size"]
    else:
        assert with_special[:2] == [tok.gmask_token_id, tok.sop_token_id]
        assert [tok.get_command("[gMASK]"), tok.get_command("sop")] == with_special[:2]
        assert tok.pad_token_id == config["pad_token_id"]
        assert tok.vocab_size <= config["padded_vocab_size"]
    assert tok.eos_token_id == config["eos_token_id"]
    assert tok.get_command("<eos>") == config["eos_token_id"]


def test_sentencepiece_vocab_sizes_plus_appended_specials():
    sp = spm.SentencePieceProcessor(model_file=os.path.join(TOKENIZER_DIR, "tokenizer.model"))
    assert tokenizer_for("chatglm2").vocab_size == sp.get_piece_size() + len(ChatGLM2Tokenizer.SPECIAL_TOKENS)
    assert tokenizer_for("chatglm3").vocab_size == tokenizer_for("chatglm2").vocab_size + 4
    v1 = tokenizer_for("chatglm")  # GLM control pieces live inside ice_text.model: nothing appended
    assert v1.vocab_size == v1.sp.get_piece_size()
    assert v1.convert_id_to_token(v1.gmask_token_id) == "[gMASK]" and v1.sp.is_control(v1.gmask_token_id)


def test_v3_role_ids_are_the_ones_in_reference_prompts():
    tok = tokenizer_for("chatglm3")
    cases = read_cases("chatglm3", "chat_prompt")
    plain = cases[0]
    tools = next(c for c in cases if c["history"] and c["history"][0]["role"] == "system" and "role" not in c)
    observation = next(c for c in cases if c.get("role") == "observation")
    assert plain["ids"][2] == tok.get_command("<|user|>") == tok.role_token_id("user")
    assert plain["ids"][-1] == tok.get_command("<|assistant|>")
    assert tools["ids"][2] == tok.get_command("<|system|>")
    assert tok.get_command("<|observation|>") in observation["ids"]
    assert tok.get_command("<|observation|>") not in tools["ids"]
    with pytest.raises(TokenizerError, match="not a special token"):
        tokenizer_for("chatglm2").get_command("<|user|>")


def test_typed_role_tokens_stay_plain_text():
    tok = tokenizer_for("chatglm3")
    ids = tok.encode("<|user|> hi <|observation|>", add_special_tokens=False)
    assert not set(ids) & {tok.get_command(f"<|{r}|>") for r in ChatGLM3Tokenizer.ROLES}
    assert tok.decode(ids) == "<|user|> hi <|observation|>"


def test_v3_decode_writes_special_names_like_the_reference():
    tok = tokenizer_for("chatglm3")
    # The reference DecodePieces keeps the space of the piece after a special name.
    assert tok.decode(tok.encode("你好")) == "[gMASK]sop 你好"
    assert tok.decode(tok.encode("你好"), skip_special_tokens=True) == "你好"
    assert tokenizer_for("chatglm2").decode(tokenizer_for("chatglm2").encode("你好")) == "你好"


@pytest.mark.parametrize("family", FAMILIES)
def test_token_id_round_trip_and_errors(family):
    tok = tokenizer_for(family)
    for token_id in tok.encode("Hello 世界\n\tx", add_special_tokens=True):
        assert tok.convert_token_to_id(tok.convert_id_to_token(token_id)) == token_id
    with pytest.raises(TokenizerError, match="neither a piece"):
        tok.convert_token_to_id("definitely-not-a-piece-xyz")
    with pytest.raises(TokenizerError, match="outside"):
        tok.convert_id_to_token(tok.vocab_size + 10_000)


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_ignores_out_of_range_ids_and_accepts_numpy(family):
    tok = tokenizer_for(family)
    ids = tok.encode("晚上睡不着", add_special_tokens=False)
    assert tok.decode(np.array(ids + [tok.vocab_size + 5, -1])) == "晚上睡不着"


def test_v1_whitespace_runs_longer_than_80_and_tabs_round_trip():
    tok = tokenizer_for("chatglm")
    for text in ["a" + " " * 81 + "b", "x" + " " * 165 + "y", "\t\tz  \n", " " * 80]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    # 165 spaces = 80 + 80 + 5, as the reference's longest-first replacement does.
    blank_80, blank_5 = tok.convert_token_to_id("<|blank_80|>"), tok.convert_token_to_id("<|blank_5|>")
    ids = tok.encode("x" + " " * 165 + "y", add_special_tokens=False)
    assert [i for i in ids if i in (blank_80, blank_5)] == [blank_80, blank_80, blank_5]


def test_v1_remove_space_and_lower_case_options():
    path = os.path.join(TOKENIZER_DIR, "ice_text.model")
    tok = ChatGLMTokenizer(path, remove_space=True, do_lower_case=True)
    assert tok.encode("  Hello    World \n") == tokenizer_for("chatglm").encode("hello world")


def test_v1_num_image_tokens_shifts_every_id():
    path = os.path.join(TOKENIZER_DIR, "ice_text.model")
    shifted = ChatGLMTokenizer(path, num_image_tokens=20000)
    plain = tokenizer_for("chatglm")
    text = "晚上睡不着  怎么办?\n"
    assert shifted.encode(text) == [i + 20000 for i in plain.encode(text)]
    assert shifted.decode(shifted.encode(text)) == plain.decode(plain.encode(text))
    assert shifted.vocab_size == plain.vocab_size + 20000


# ---------------------------------------------------------------------- batching
@pytest.mark.parametrize("family", ["chatglm2", "chatglm3"])
def test_pad_batch_reproduces_reference_padding(family):
    golden = np.load(os.path.join(FIXTURES, "models", f"{family}-tiny", "golden.npz"))
    rows = [ids[mask == 1].tolist() for ids, mask in zip(golden["batch_input_ids"], golden["batch_attention_mask"])]
    batch = tokenizer_for(family).pad_batch(rows)
    np.testing.assert_array_equal(batch["input_ids"], golden["batch_input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"], golden["batch_attention_mask"])
    np.testing.assert_array_equal(batch["position_ids"], golden["batch_position_ids"])
    assert batch["input_ids"].dtype == np.int64


@pytest.mark.parametrize("family", ["chatglm2", "chatglm3"])
def test_batch_encode_left_pads_texts(family):
    tok = tokenizer_for(family)
    short, long = read_cases(family, "encode")[0], read_cases(family, "encode")[3]
    batch = tok.batch_encode([short["text"], long["text"]], pad_to_multiple_of=8)
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and width >= len(long["ids"])
    pad = width - len(short["ids"])
    assert batch["input_ids"][0].tolist() == [tok.pad_token_id] * pad + short["ids"]
    assert batch["attention_mask"][0].tolist() == [0] * pad + [1] * len(short["ids"])
    assert batch["position_ids"][0].tolist() == [0] * pad + list(range(len(short["ids"])))


def test_v1_batch_positions_are_glm_2d_positions():
    tok = tokenizer_for("chatglm")
    short, long = read_cases("chatglm", "encode")[0], read_cases("chatglm", "encode")[3]
    batch = tok.batch_encode([short["text"], long["text"]], pad_to_length=12)
    assert batch["position_ids"].shape == (2, 2, 12)
    for row, case in enumerate([short, long]):
        ids = case["ids"]  # text..., [gMASK], <sop>
        n, pad = len(ids), 12 - len(ids)
        context = n - 1  # <sop> is last: positions count up to [gMASK], <sop> repeats its position
        assert batch["input_ids"][row].tolist() == [tok.pad_token_id] * pad + ids
        assert batch["position_ids"][row, 0].tolist() == [0] * pad + list(range(context)) + [n - 2]
        assert batch["position_ids"][row, 1].tolist() == [0] * (pad + context) + [1]
        assert batch["attention_mask"][row].tolist() == [0] * pad + [1] * n


def test_v1_positions_follow_mask_token_and_generated_tokens():
    tok = tokenizer_for("chatglm")
    prefix = tok.encode("北京是", add_special_tokens=False)
    suffix = tok.encode("的首都", add_special_tokens=False)
    ids = prefix + [tok.mask_token_id] + suffix + [tok.gmask_token_id, tok.sop_token_id, 100, 200]
    positions = tok.pad_batch([ids])["position_ids"][0]
    context = len(ids) - 3  # index of <sop>
    assert positions[0].tolist() == list(range(context)) + [len(prefix)] * 3
    assert positions[1].tolist() == [0] * context + [1, 2, 3]


def test_batch_errors():
    tok = tokenizer_for("chatglm2")
    with pytest.raises(TokenizerError, match="empty batch"):
        tok.batch_encode([])
    with pytest.raises(TokenizerError, match="pad_to_length"):
        tok.batch_encode(["一段比较长的文字，用来超过长度"], pad_to_length=3)
    with pytest.raises(TypeError):
        tok.batch_encode("not a list")


# ---------------------------------------------------------------------- loading
@pytest.mark.parametrize("family", FAMILIES)
def test_load_tokenizer_infers_family_of_e2e_dirs(family):
    tok = load_tokenizer(os.path.join(FIXTURES, "chat", f"{family}-e2e"))
    assert tok.family == family
    assert type(tok) is {"chatglm": ChatGLMTokenizer, "chatglm2": ChatGLM2Tokenizer,
                         "chatglm3": ChatGLM3Tokenizer}[family]
    case = read_cases(family, "encode")[1]
    assert tok.encode(case["text"]) == case["ids"]


def test_load_tokenizer_file_inside_model_dir_uses_its_config():
    path = os.path.join(FIXTURES, "chat", "chatglm2-e2e", "tokenizer.model")
    assert load_tokenizer(path).family == "chatglm2"


def test_bare_tokenizer_model_defaults_to_chatglm3_with_warning(tmp_path):
    shutil.copy(os.path.join(TOKENIZER_DIR, "tokenizer.model"), tmp_path)
    with pytest.warns(UserWarning, match="assuming chatglm3"):
        assert load_tokenizer(str(tmp_path)).family == "chatglm3"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_tokenizer(str(tmp_path / "tokenizer.model"), family="chatglm2").family == "chatglm2"


def test_bare_ice_text_model_is_chatglm():
    assert load_tokenizer(os.path.join(TOKENIZER_DIR, "ice_text.model")).family == "chatglm"


def test_tokenizer_config_name_decides_without_config_json(tmp_path):
    shutil.copy(os.path.join(TOKENIZER_DIR, "tokenizer.model"), tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"name_or_path": "THUDM/chatglm2-6b"}))
    assert load_tokenizer(str(tmp_path)).family == "chatglm2"


def test_missing_path_is_one_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nowhere"))
    with pytest.raises(TokenizerError, match="no ice_text.model or tokenizer.model"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": "THUDM/chatglm3-6b"}))
    with pytest.raises(TokenizerError, match="has no tokenizer.model"):
        load_tokenizer(str(tmp_path))


def test_corrupt_and_lfs_pointer_files_are_clear_errors(tmp_path):
    corrupt = tmp_path / "tokenizer.model"
    corrupt.write_bytes(os.urandom(512))
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        load_tokenizer(str(corrupt), family="chatglm3")
    corrupt.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1018370\n")
    with pytest.raises(TokenizerError, match="git-lfs pointer"):
        load_tokenizer(str(corrupt), family="chatglm3")
    empty = tmp_path / "ice_text.model"
    empty.write_bytes(b"")
    with pytest.raises(TokenizerError, match=str(empty)):
        load_tokenizer(str(empty))


def test_wrong_family_for_file_and_unknown_family():
    with pytest.raises(TokenizerError, match="family='chatglm'"):
        load_tokenizer(os.path.join(TOKENIZER_DIR, "ice_text.model"), family="chatglm3")
    with pytest.raises(TokenizerError, match="not ChatGLM-6B's"):
        load_tokenizer(os.path.join(TOKENIZER_DIR, "tokenizer.model"), family="chatglm")
    with pytest.raises(TokenizerError, match="unknown tokenizer family"):
        load_tokenizer(TOKENIZER_DIR, family="glm4")


def test_tokenizer_error_is_a_value_error():
    assert issubclass(TokenizerError, ValueError)


PUNCTUATED = ["Wait …", "Hello , world ! Is it ? I don 't know . It 's ok", "a ' b", "We 're here , we 've won ; I 'm",
              "你好 。 好的 ... 再见 !"]


def test_v1_decode_cleans_up_spaces_before_punctuation():
    """ChatGLM-6B decodes under transformers' default clean_up_tokenization_spaces=True."""
    tokenizer = tokenizer_for("chatglm")
    ids = tokenizer.encode("Wait …", add_special_tokens=False)  # sentencepiece normalises … to ...
    assert tokenizer.decode(ids) == "Wait..."
    assert tokenizer.decode(ids, clean_up_tokenization_spaces=False) == "Wait ..."
    ids = tokenizer.encode("I don 't know , it 's fine !", add_special_tokens=False)
    assert tokenizer.decode(ids) == "I don 't know, it's fine!"


@pytest.mark.parametrize("family", ["chatglm2", "chatglm3"])
def test_v2_v3_decode_keeps_spaces(family):
    tokenizer = tokenizer_for(family)
    ids = tokenizer.encode("Hello , world !", add_special_tokens=False)
    assert tokenizer.decode(ids) == "Hello , world !"
    assert tokenizer.decode(ids, clean_up_tokenization_spaces=True) == "Hello, world!"


@pytest.mark.parametrize("family", ["chatglm", "chatglm2", "chatglm3"])
def test_decode_cleanup_matches_transformers(family):
    """Oracle: transformers' own clean_up_tokenization on our uncleaned text, per family's default."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    except ImportError:
        pytest.skip("optional oracle: transformers is not installed (pip install transformers)")
    clean = PreTrainedTokenizerBase.clean_up_tokenization  # a method (v5) or a staticmethod (v4)
    reference = (lambda text: clean(text)) if isinstance(
        PreTrainedTokenizerBase.__dict__["clean_up_tokenization"], staticmethod) else (lambda text: clean(None, text))
    tokenizer = tokenizer_for(family)
    for text in PUNCTUATED:
        ids = tokenizer.encode(text, add_special_tokens=False)
        raw = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        expected = reference(raw) if family == "chatglm" else raw
        assert tokenizer.decode(ids) == expected, text
        assert tokenizer.decode(ids, clean_up_tokenization_spaces=True) == reference(raw), text


def test_load_tokenizer_names_what_is_wrong_with_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty.model").write_bytes(b"")
    with pytest.raises(TokenizerError, match="notes.txt' is not a sentencepiece model"):
        load_tokenizer(str(tmp_path / "notes.txt"))
    with pytest.raises(TokenizerError, match="empty.model' is an empty file, not a sentencepiece model"):
        load_tokenizer(str(tmp_path / "empty.model"))
    # the failures leave nothing behind: a real tokenizer in the same directory still loads
    shutil.copy(os.path.join(TOKENIZER_DIR, "ice_text.model"), tmp_path / "ice_text.model")
    assert load_tokenizer(str(tmp_path)).encode("你好") == tokenizer_for("chatglm").encode("你好")


def test_load_tokenizer_reads_a_valid_tokenizer_under_another_name(tmp_path):
    shutil.copy(os.path.join(TOKENIZER_DIR, "ice_text.model"), tmp_path / "glm_v1.spm")
    shutil.copy(os.path.join(TOKENIZER_DIR, "tokenizer.model"), tmp_path / "glm_v2.bin")
    v1 = load_tokenizer(str(tmp_path / "glm_v1.spm"))
    assert isinstance(v1, ChatGLMTokenizer) and v1.encode("你好") == tokenizer_for("chatglm").encode("你好")
    with pytest.warns(UserWarning, match="assuming chatglm3"):
        v3 = load_tokenizer(str(tmp_path / "glm_v2.bin"))
    assert isinstance(v3, ChatGLM3Tokenizer)
    assert isinstance(load_tokenizer(str(tmp_path / "glm_v2.bin"), family="chatglm2"), ChatGLM2Tokenizer)
