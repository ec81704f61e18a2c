"""Run configuration from YAML: model, tokenizer, checkpoint, device context and generation.

A run config is a YAML file with MindFormers-like sections (every key is checked; an unknown key
at any level, a wrong type or a missing file is one `ConfigError` that names it):

    model:
      family: chatglm3              # chatglm | chatglm2 | chatglm3
      model_config:                 # GLMConfig field names (mindglm/config.py)
        hidden_size: 4096
        compute_dtype: bfloat16
        use_past: true
        ...
    processor:
      tokenizer: /path/to/tokenizer.model   # or a model dir; default: the checkpoint's dir
    context:
      mode: PYNATIVE_MODE           # or GRAPH_MODE
      device_target: Ascend         # CPU | GPU | Ascend
      device_id: 0
      compile_cache: ~/.cache/mindglm  # optional: reuse compiled graphs across runs (README caveat)
    checkpoint: /path/to/model.ckpt # or a THUDM model dir (config.json + .bin/.safetensors)
    adapter: /path/to/adapter       # optional: a peft LoRA dir or a THUDM P-Tuning v2 dir
    generation:                     # GenerationConfig fields; omitted ones take the family's
      max_length: 8192              # THUDM chat() defaults (CHAT_DEFAULTS)
      do_sample: true
      top_p: 0.8

Relative paths are resolved against the YAML file's own directory; paths given as overrides
(`--set checkpoint=...`, `--checkpoint`) against the current directory. When the checkpoint is a
THUDM directory (or a .ckpt with a config.json beside it), the network hyper-parameters are read
from that config.json and `model.model_config` only overrides them.

    run = load_run_config("configs/glm3/chatglm3_6b.yaml", ["generation.top_p=0.5"])
    apply_context(run.context)          # mindspore.set_device / set_context
    tokenizer = run.load_tokenizer()
    model = mindglm.pipeline.load_run_model(run)  # building belongs to pipeline; this module only reads
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import importlib.metadata
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Union

import yaml

from mindglm.config import FAMILIES, ConfigError, GLMConfig, is_type, type_names
from mindglm.engine.config import EngineConfig
from mindglm.generation.config import GenerationConfig
from mindglm.parallel.context import ParallelConfig
from mindglm.runtime import launch_from_host_thread_on_cpu

CONVERT_HINT = "python -m ckpt_convert --src <THUDM dir> --dst <file.ckpt>"

# THUDM's `chat()` defaults per family; a YAML `generation` section overrides them key by key.
CHAT_DEFAULTS = {
    "chatglm": {"max_length": 2048, "do_sample": True, "top_p": 0.7, "temperature": 0.95},
    "chatglm2": {"max_length": 8192, "do_sample": True, "top_p": 0.8, "temperature": 0.8},
    "chatglm3": {"max_length": 8192, "do_sample": True, "top_p": 0.8, "temperature": 0.8},
}

MODES = ("GRAPH_MODE", "PYNATIVE_MODE")  # MindSpore's numeric modes: 0 and 1
DEVICE_TARGETS = ("CPU", "GPU", "Ascend")
DEFAULT_CONTEXT = {"mode": "PYNATIVE_MODE", "device_target": "CPU", "device_id": 0}

_NONE = type(None)
_GLM_FIELDS = {f.name for f in dataclasses.fields(GLMConfig)}
# Leaves whose values are checked by the dataclass they fill (GenerationConfig), not here.
CHECKED_LATER = object()

# The shape of a run config: a dict is a section (its keys are the only ones allowed), a tuple
# of types is a leaf. `model.model_config` is checked by GLMConfig itself.
SCHEMA: dict = {
    "model": {"family": (str,), "model_config": (dict,)},
    "processor": {"tokenizer": (str, _NONE)},
    "context": {"mode": (str, int), "device_target": (str,), "device_id": (int, _NONE),
                "compile_cache": (str, _NONE)},
    "checkpoint": (str, _NONE),
    "adapter": (str, _NONE),
    "generation": {f.name: CHECKED_LATER for f in dataclasses.fields(GenerationConfig)},
    "engine": {f.name: CHECKED_LATER for f in dataclasses.fields(EngineConfig)},
    "parallel": {f.name: CHECKED_LATER for f in dataclasses.fields(ParallelConfig)},
}


@dataclass
class RunConfig:
    """A validated run configuration.

    model: the network's GLMConfig; checkpoint: absolute path to a .ckpt or THUDM dir (None when
    the config names none); tokenizer: absolute path to a tokenizer file or dir (None when
    unknown); generation: the decoding defaults (family chat defaults + YAML);
    generation_settings: the same as keyword arguments for `chat()` / `generate()` (unset
    values left out); context: {mode, device_target, device_id}; source: where it came from;
    notes: adjustments made while loading that a front end should show the user.
    """

    model: GLMConfig
    checkpoint: Optional[str]
    tokenizer: Optional[str]
    generation: GenerationConfig
    context: dict
    source: str
    generation_settings: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    engine: EngineConfig = field(default_factory=EngineConfig)
    adapter: Optional[str] = None   # a peft LoRA or THUDM P-Tuning v2 dir (mindglm/adapters)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @property
    def family(self) -> str:
        return self.model.family

    def require_checkpoint(self) -> str:
        """The checkpoint path, or a ConfigError saying how to get one."""
        if self.checkpoint is None:
            raise ConfigError(f"{self.source}: no checkpoint given; set `checkpoint:` in the YAML or pass "
                              f"--checkpoint (a THUDM model dir, or a .ckpt made with `{CONVERT_HINT}`)")
        return self.checkpoint

    def load_tokenizer(self):
        """The tokenizer of this run (the family of the model config decides its type)."""
        from mindglm.tokenization import load_tokenizer
        if self.tokenizer is None:
            raise ConfigError(f"{self.source}: no tokenizer: set `processor.tokenizer` to the model's "
                              "tokenizer.model / ice_text.model (or its THUDM dir), e.g. "
                              "--set processor.tokenizer=/path/to/chatglm3-6b")
        return load_tokenizer(self.tokenizer, family=self.family)


# ---------------------------------------------------------------------------------- YAML reading
class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-5` as a float (YAML 1.1 wants `1.0e-5`) and rejects duplicate keys."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str) -> Any:
    """YAML text -> Python value; a syntax error is a ConfigError naming the file and line."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark, start = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        # An unclosed bracket or quote is only noticed on a later line (or at the end of the file):
        # name the line where the construct began, which is where the mistake is.
        if start is not None and mark is not None and start.line < mark.line:
            context = getattr(exc, "context", None) or "the construct"
            problem += f" ({context} started at line {start.line + 1}, column {start.column + 1})"
        raise ConfigError(f"{source}: invalid YAML{where}: {problem}") from None


def read_yaml(path: str) -> dict:
    """The top-level mapping of a YAML file."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist: pass a YAML file such as "
                          "configs/glm3/chatglm3_6b.yaml")
    with open(path, encoding="utf-8") as handle:
        raw = parse_yaml(handle.read(), path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with sections {sorted(SCHEMA)}, got {type(raw).__name__}")
    return raw


# ---------------------------------------------------------------------------------- checks
def _unknown_key(source: str, path: str, key: str, known: Iterable[str]) -> ConfigError:
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    full = f"{path}.{key}" if path else key
    return ConfigError(f"{source}: unknown key '{full}'{hint} (known keys{' under ' + repr(path) if path else ''}: "
                       f"{', '.join(known)})")


def check_schema(raw: dict, source: str, schema: dict = SCHEMA, path: str = "") -> None:
    """Every key known, every leaf of the right type (model_config is left to GLMConfig)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{path}' must be a mapping, got {raw!r}")
    for key, value in raw.items():
        if not isinstance(key, str) or key not in schema:
            raise _unknown_key(source, path, str(key), schema)
        spec, full = schema[key], f"{path}.{key}" if path else key
        if isinstance(spec, dict):
            if value is None:  # an empty section (`generation:` with nothing under it)
                continue
            check_schema(value, source, spec, full)
        elif spec is not CHECKED_LATER and not is_type(value, spec):
            raise ConfigError(f"{source}: key '{full}' must be {type_names(spec)}, got {value!r} "
                              f"({type(value).__name__})")


def _check_context(context: dict, source: str) -> dict:
    values = dict(DEFAULT_CONTEXT)
    values.update({k: v for k, v in (context or {}).items()})
    mode = values["mode"]
    if isinstance(mode, int) and not isinstance(mode, bool):
        if mode not in (0, 1):
            raise ConfigError(f"{source}: key 'context.mode' is {mode}; expected GRAPH_MODE (0) or PYNATIVE_MODE (1)")
        mode = MODES[mode]
    if mode not in MODES:
        raise ConfigError(f"{source}: key 'context.mode' is {mode!r}; expected one of {', '.join(MODES)}")
    target = values["device_target"]
    matches = [t for t in DEVICE_TARGETS if t.lower() == str(target).lower()]
    if not matches:
        raise ConfigError(f"{source}: key 'context.device_target' is {target!r}; expected one of "
                          f"{', '.join(DEVICE_TARGETS)}")
    device_id = values["device_id"]
    if device_id is not None and device_id < 0:
        raise ConfigError(f"{source}: key 'context.device_id' must be >= 0, got {device_id}")
    checked = {"mode": mode, "device_target": matches[0], "device_id": device_id}
    if values.get("compile_cache"):  # opt-in: absent unless configured
        checked["compile_cache"] = values["compile_cache"]
    return checked


def sources_digest(package: str) -> str:
    """sha256 over the names and contents of every .py file under `package`."""
    digest = hashlib.sha256()
    for folder, _, names in sorted(os.walk(package)):
        for name in sorted(n for n in names if n.endswith(".py")):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, package).encode())
            with open(path, "rb") as handle:
                digest.update(handle.read())
    return digest.hexdigest()


def compile_cache_dir(root: str, model: GLMConfig) -> str:
    """`root`/<family>-<hash>, the hash over the model config, mindglm's sources and the MindSpore
    version. MindSpore validates a cache only against the entry script and the sources it imports
    from outside sys.path, which leaves out an installed mindglm (and the repository the scripts
    put on sys.path) and the sizes a config gives the same code: so those key the directory."""
    digest = hashlib.sha256(json.dumps(model.to_dict(), sort_keys=True).encode())
    digest.update(sources_digest(os.path.dirname(os.path.abspath(__file__))).encode())
    try:
        digest.update(importlib.metadata.version("mindspore").encode())
    except importlib.metadata.PackageNotFoundError:
        pass
    return os.path.join(root, f"{model.family}-{digest.hexdigest()[:12]}")


def _resolve_path(value: Optional[str], base_dir: str) -> Optional[str]:
    if value is None:
        return None
    value = os.path.expandvars(os.path.expanduser(value))
    return os.path.normpath(value if os.path.isabs(value) else os.path.join(base_dir, value))


def _thudm_config_dir(checkpoint: Optional[str]) -> Optional[str]:
    """The directory whose config.json describes `checkpoint`, if there is one."""
    if checkpoint is None:
        return None
    folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint)
    return folder if os.path.isfile(os.path.join(folder, "config.json")) else None


def _default_tokenizer(checkpoint: Optional[str]) -> Optional[str]:
    if checkpoint is None:
        return None
    folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint)
    for name in ("tokenizer.model", "ice_text.model"):
        if os.path.isfile(os.path.join(folder, name)):
            return folder
    return None


# ---------------------------------------------------------------------------------- overrides
def _parse_override(item) -> tuple:
    """(key path, value, text or None): text is the raw string of a KEY=VALUE override."""
    if isinstance(item, tuple):
        key, value = item
        return str(key), value, None
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. generation.top_p=0.5")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.load(text, Loader=_Loader) if text.strip() else None
    except yaml.YAMLError:
        value = text  # not YAML (e.g. a path with ': '): keep it as a string
    return key, value, text


def apply_overrides(raw: dict, overrides: Iterable[Union[str, tuple]] = ()) -> dict:
    """A copy of the run-config dict `raw` with `KEY.PATH=VALUE` overrides applied.

    Values are YAML-typed (`0.5` a float, `true` a bool, `null` None, `[1, 2]` a list); a
    `(key_path, value)` tuple sets a Python value as is. An unknown key path is a ConfigError
    naming it.
    """
    result = copy.deepcopy(raw) if raw else {}
    for item in overrides:
        key, value, text = _parse_override(item)
        parts = key.split(".")
        if not key or not all(parts):
            raise ConfigError(f"override {item!r}: empty key")
        node, spec, path = result, SCHEMA, ""
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if spec is None:  # inside model.model_config: GLMConfig fields, one level
                if part not in _GLM_FIELDS or not last:
                    raise _unknown_key("override " + repr(item), path, part, _GLM_FIELDS)
            elif part not in spec:
                raise _unknown_key("override " + repr(item), path, part, spec)
            path = f"{path}.{part}" if path else part
            if last:
                leaf = spec.get(part) if spec is not None else None
                if text is not None and isinstance(leaf, tuple) and str in leaf and not is_type(value, leaf):
                    value = text  # a string key (a path): `123` or `/a: b` stay text
                node[part] = value
                break
            child_spec = spec[part] if spec is not None else None
            if path == "model.model_config":
                child_spec = None
            elif not isinstance(child_spec, dict):
                raise ConfigError(f"override {item!r}: '{path}' is a value, not a section")
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node, spec = node[part], child_spec
    return result


# ---------------------------------------------------------------------------------- building
def build_run_config(raw: dict, source: str, base_dir: str, overrides: Iterable = ()) -> RunConfig:
    """RunConfig from a run-config dict: paths in `raw` are relative to `base_dir`, paths in
    `overrides` to the current directory."""
    check_schema(raw, source)
    raw = copy.deepcopy(raw)
    for key in ("checkpoint", "adapter"):
        if raw.get(key) is not None:
            raw[key] = _resolve_path(raw[key], base_dir)
    processor = raw.get("processor") or {}
    if processor.get("tokenizer") is not None:
        processor["tokenizer"] = _resolve_path(processor["tokenizer"], base_dir)
    if (raw.get("context") or {}).get("compile_cache") is not None:
        raw["context"]["compile_cache"] = _resolve_path(raw["context"]["compile_cache"], base_dir)
    overrides = list(overrides)
    if overrides:
        raw = apply_overrides(raw, overrides)
        source = f"{source} (with overrides)"
        check_schema(raw, source)
    checkpoint = _resolve_path(raw.get("checkpoint"), os.getcwd())
    adapter = _resolve_path(raw.get("adapter"), os.getcwd())
    if adapter is not None and not os.path.isdir(adapter):
        raise ConfigError(f"{source}: key 'adapter': {adapter} is not a directory; point it at a peft LoRA dir "
                          "(adapter_config.json + adapter_model.safetensors) or a THUDM P-Tuning v2 dir")
    processor = raw.get("processor") or {}
    tokenizer = _resolve_path(processor.get("tokenizer"), os.getcwd())

    if checkpoint is not None and not os.path.exists(checkpoint):
        raise ConfigError(f"{source}: key 'checkpoint': {checkpoint} does not exist; point it at a THUDM "
                          f"model directory or convert one with `{CONVERT_HINT}`")
    if tokenizer is not None and not os.path.exists(tokenizer):
        raise ConfigError(f"{source}: key 'processor.tokenizer': {tokenizer} does not exist; point it at "
                          "tokenizer.model / ice_text.model or the model's THUDM directory")
    if tokenizer is None:
        tokenizer = _default_tokenizer(checkpoint)

    model_section = raw.get("model") or {}
    model_values = dict(model_section.get("model_config") or {})
    family = model_section.get("family")
    values: dict = {}
    thudm_dir = _thudm_config_dir(checkpoint)
    if thudm_dir is not None:
        values = GLMConfig.from_thudm(thudm_dir).to_dict()
    elif not model_values and family is None:
        raise ConfigError(f"{source}: no 'model' section, and the checkpoint is not a THUDM directory with a "
                          "config.json to read the hyper-parameters from: copy the model section of a "
                          "config under configs/")
    if "family" in model_values and family is not None and model_values["family"] != family:
        raise ConfigError(f"{source}: 'model.family' ({family}) and 'model.model_config.family' "
                          f"({model_values['family']}) disagree")
    if family is not None:
        if family not in FAMILIES:
            raise ConfigError(f"{source}: key 'model.family' is {family!r}; expected one of {', '.join(FAMILIES)}")
        model_values["family"] = family
    values.update(model_values)
    notes = []
    if (raw.get("context") or {}).get("compile_cache") is not None:
        raw["context"]["compile_cache"] = _resolve_path(raw["context"]["compile_cache"], os.getcwd())
    context = _check_context(raw.get("context"), source)
    device = context["device_target"]
    if values.get("use_flash_attention") and device != "Ascend":
        values["use_flash_attention"] = False
        notes.append(f"use_flash_attention is Ascend-only: disabled on {device}")
    if device == "CPU":  # MindSpore's CPU kernels (matmul, cache scatter) have no bfloat16
        if values.get("compute_dtype") == "bfloat16":
            raise ConfigError(f"{source}: key 'model.model_config.compute_dtype' is bfloat16, which MindSpore "
                              "cannot compute on CPU: add --set model.model_config.compute_dtype=float32")
        if values.get("param_dtype") == "bfloat16":
            values["param_dtype"] = "float32"
            notes.append("param_dtype bfloat16 is not supported on CPU: weights are kept in float32 (lossless)")
    model = GLMConfig.from_dict(values, source=f"{source}: model.model_config")
    if "compile_cache" in context:
        context["compile_cache"] = compile_cache_dir(context["compile_cache"], model)

    generation_values = dict(CHAT_DEFAULTS[model.family])
    generation_values.update(raw.get("generation") or {})
    try:
        generation = GenerationConfig(**generation_values)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}".replace("generation setting '", "key 'generation.")) from None
    settings = {k: v for k, v in dataclasses.asdict(generation).items() if v is not None}
    try:
        engine = EngineConfig(**(raw.get("engine") or {}))
        engine.model_len(model.seq_length)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}".replace("engine setting '", "key 'engine.")) from None
    try:
        parallel = ParallelConfig(**(raw.get("parallel") or {}))
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}".replace("parallel setting '", "key 'parallel.")) from None
    return RunConfig(model=model, checkpoint=checkpoint, tokenizer=tokenizer, generation=generation,
                     context=context, source=source, generation_settings=settings, notes=notes, engine=engine,
                     adapter=adapter, parallel=parallel)


def load_run_config(path: str, overrides: Iterable = ()) -> RunConfig:
    """Read, validate and resolve a YAML run config (see the module docstring)."""
    path = os.fspath(path)
    raw = read_yaml(path)
    return build_run_config(raw, path, os.path.dirname(os.path.abspath(path)), overrides)


def run_config_for_checkpoint(checkpoint: str, overrides: Iterable = ()) -> RunConfig:
    """RunConfig for a bare THUDM model dir (or a .ckpt with config.json beside it): the family,
    hyper-parameters and tokenizer come from the directory, generation from the family defaults;
    the KV-cached decode path (use_past) is on, the device is CPU unless overridden."""
    checkpoint = os.path.abspath(os.path.expanduser(checkpoint))
    source = f"--checkpoint {checkpoint}"
    if not os.path.exists(checkpoint):
        raise ConfigError(f"checkpoint {checkpoint} does not exist; pass a THUDM model directory "
                          f"(config.json, weights, tokenizer) or convert one with `{CONVERT_HINT}`")
    if _thudm_config_dir(checkpoint) is None:
        raise ConfigError(f"{checkpoint}: no config.json beside it to read the model's hyper-parameters from; "
                          "pass a YAML config as well (--config configs/<family>/<model>.yaml --checkpoint ...)")
    # the cached, compiled decode path: what a chat or batch front end wants
    raw = {"checkpoint": checkpoint, "model": {"model_config": {"use_past": True}}}
    return build_run_config(raw, source, os.getcwd(), overrides)


# ---------------------------------------------------------------------------------- device
class _CapturedStderr:
    """Collect what is written to file descriptor 2 (MindSpore's C++ and Python logs) meanwhile."""

    def __enter__(self):
        sys.stderr.flush()
        self.file = tempfile.TemporaryFile(mode="w+b")
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.seek(0)
        self.text = self.file.read().decode("utf-8", "replace")
        self.file.close()
        return False


def apply_context(context: dict) -> None:
    """Point MindSpore at the configured device and execution mode.

    A device this MindSpore install cannot use is one ConfigError saying what is available
    (MindSpore's own diagnostics are kept out of the way).
    """
    context = _check_context(context, "context")
    if context.get("compile_cache"):
        # read when MindSpore compiles a graph, so set before the first compilation
        try:
            os.makedirs(context["compile_cache"], exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"context.compile_cache: cannot create {context['compile_cache']} ({exc.strerror}): "
                              "point it at a writable directory, or remove the key") from None
        os.environ["MS_COMPILER_CACHE_ENABLE"] = "1"
        os.environ["MS_COMPILER_CACHE_PATH"] = context["compile_cache"]
    import mindspore as ms

    target, device_id = context["device_target"], context["device_id"]
    if os.environ.get("MS_ROLE") == "MS_WORKER" and os.environ.get("DEVICE_ID"):
        device_id = int(os.environ["DEVICE_ID"])  # msrun gives each worker its own device
    captured = _CapturedStderr()
    error = None
    try:
        with captured:
            ms.set_device(target, device_id)
    except (RuntimeError, ValueError, TypeError) as exc:
        error = str(exc)
    if error is not None:
        found = re.search(r"only supports one of the (\[[^\]]*\])", error)
        available = f" (this MindSpore install supports {found.group(1)})" if found else ""
        first = error.strip().splitlines()[0] if error.strip() else "unknown error"
        reason = "" if found else f": {first}"
        hint = " add --device CPU --set model.model_config.compute_dtype=float32" if target != "CPU" else ""
        raise ConfigError(f"device_target {target} (device_id {device_id}) is not available here{available}"
                          f"{reason};{hint or ' check the MindSpore installation'}")
    if captured.text.strip() and os.environ.get("GLOG_v", "2") not in ("3", "4"):
        sys.stderr.write(captured.text)
    ms.set_context(mode=ms.GRAPH_MODE if context["mode"] == "GRAPH_MODE" else ms.PYNATIVE_MODE)
    launch_from_host_thread_on_cpu()      # the target is known now; nothing has run yet


def resolve_run(config: Optional[str] = None, checkpoint: Optional[str] = None, device: Optional[str] = None,
                overrides: Iterable = (), adapter: Optional[str] = None) -> RunConfig:
    """The RunConfig of a front end's `--config / --checkpoint / --device / --set / --adapter` options.

    With a config, `checkpoint` (relative to the current directory) replaces its `checkpoint`;
    without one, `checkpoint` must be a THUDM model dir (or a .ckpt beside a config.json).
    """
    extra = [("context.device_target", device)] if device else []
    extra += list(overrides)
    if adapter:
        extra.append(("adapter", os.path.abspath(os.path.expanduser(adapter))))
    if config:
        if checkpoint:
            extra.insert(0, ("checkpoint", os.path.abspath(os.path.expanduser(checkpoint))))
        return load_run_config(config, extra)
    if checkpoint:
        return run_config_for_checkpoint(checkpoint, extra)
    raise ConfigError("no model given: pass --config <file.yaml> and/or --checkpoint <THUDM dir or .ckpt>")
