"""context.compile_cache: MindSpore's graph cache, opt-in, one directory per model config."""
import json
import os
import subprocess
import sys

import pytest

from conftest import reference_chat
from mindglm.config import ConfigError
from mindglm.yaml_config import load_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny", "chatglm3_e2e.yaml")
PROMPT = [64790, 64792, 36474, 54591]  # [gMASK] sop 你好 ...

GENERATE = """
import json, sys
sys.path.insert(0, {root!r})
from mindglm.yaml_config import load_run_config, apply_context
from mindglm.pipeline import load_run_model
run = load_run_config({config!r}, [("context.compile_cache", {cache!r})])
apply_context(run.context)
print(json.dumps(load_run_model(run).generate([{prompt!r}], max_new_tokens=6, eos_token_id=-1)[0].tolist()))
"""


def test_cache_dir_is_per_model_config(tmp_path):
    run = load_run_config(TINY, [f"context.compile_cache={tmp_path}"])
    other = load_run_config(TINY, [f"context.compile_cache={tmp_path}", "model.model_config.seq_length=256"])
    assert os.path.dirname(run.context["compile_cache"]) == str(tmp_path)
    assert os.path.basename(run.context["compile_cache"]).startswith("chatglm3-")
    assert run.context["compile_cache"] != other.context["compile_cache"]
    assert "compile_cache" not in load_run_config(TINY).context  # off unless asked for


def test_a_second_process_reuses_the_cache_and_generates_the_same_ids(tmp_path):
    # a script file: MindSpore hashes the entry script and the sources it imports to validate its cache
    script = tmp_path / "generate.py"
    script.write_text(GENERATE.format(root=ROOT, config=TINY, cache=str(tmp_path / "cache"), prompt=PROMPT))
    env = {**os.environ, "GLOG_v": "3"}
    runs = [subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, env=env,
                           cwd=ROOT) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr
    cache = load_run_config(TINY, [f"context.compile_cache={tmp_path / 'cache'}"]).context["compile_cache"]
    assert any(name.endswith(".mindir") for name in os.listdir(os.path.join(cache, "rank_0", "graph_cache")))
    model = reference_chat(TINY)[0]  # this process: no cache
    expected = model.generate([PROMPT], max_new_tokens=6, eos_token_id=-1)[0].tolist()
    assert [json.loads(r.stdout.strip().splitlines()[-1]) for r in runs] == [expected, expected]


def test_unwritable_cache_dir_is_a_config_error(tmp_path):
    from mindglm.yaml_config import apply_context
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="context.compile_cache: cannot create .*: point it at a writable directory"):
        apply_context({"compile_cache": str(blocker / "cache")})


def test_cache_dir_changes_with_mindglm_sources(tmp_path):
    """MindSpore does not hash an installed mindglm's sources: the directory name does."""
    import shutil
    from mindglm.yaml_config import sources_digest
    copy = tmp_path / "mindglm"
    shutil.copytree(os.path.join(ROOT, "mindglm"), copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = sources_digest(str(copy))
    assert before == sources_digest(os.path.join(ROOT, "mindglm"))
    layers = copy / "models" / "layers.py"
    layers.write_text(layers.read_text() + "\n# edited\n")
    assert sources_digest(str(copy)) != before
