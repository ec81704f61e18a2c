"""Tensor parallelism over 2 CPU workers launched by msrun, against the single process and the
golden fixtures: every family, with the KV cache, stored int8 / int4, int8 quantized on load and
a peft LoRA adapter (unmerged; merged shares are checked without a launch).

One msrun launch serves the whole module (tests/tp_worker.py runs every case and saves its
numbers per rank); the checks below read them. The bad-input checks need no launch.
"""
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("mindspore")

from mindglm.config import ConfigError, GLMConfig  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CASES = ("chatglm", "chatglm2", "chatglm3", "chatglm2-int8", "chatglm-int4", "chatglm3-q8", "chatglm3-lora-unmerged")
GOLDEN_CASES = {"chatglm": ("single", "mask"), "chatglm2": ("single", "batch"), "chatglm3": ("single", "batch"),
                "chatglm2-int8": ("single", "batch"), "chatglm-int4": ("single",), "chatglm3-lora-unmerged": ("single",)}
LAUNCH_TIMEOUT = 900


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def msrun(script_args, log_dir, workers=2, timeout=LAUNCH_TIMEOUT, env=None, stdin=None):
    """Run an msrun launch in its own process group; kill the whole group if it overstays."""
    msrun_bin = shutil.which("msrun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    if msrun_bin is None:
        pytest.skip("msrun is not installed next to this Python")
    environment = dict(os.environ, GLOG_v="3", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    environment.update(env or {})
    command = [msrun_bin, f"--worker_num={workers}", f"--local_worker_num={workers}", f"--master_port={free_port()}",
               "--join=True", f"--log_dir={log_dir}", "--cluster_time_out=120"] + list(script_args)
    proc = subprocess.Popen(command, cwd=ROOT, env=environment, stdin=stdin if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        raise AssertionError(f"msrun did not finish within {timeout} s; logs in {log_dir}")
    return proc.returncode, output


def worker_log(log_dir, rank) -> str:
    with open(os.path.join(log_dir, f"worker_{rank}.log"), encoding="utf-8", errors="replace") as handle:
        return handle.read()


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """The module's one msrun launch: every tensor-parallel case, then data-parallel fine-tuning."""
    out = tmp_path_factory.mktemp("tp")
    finetune = finetune_config(out / "dp")
    code, output = msrun([os.path.join(HERE, "tp_worker.py"), str(out)] + list(CASES) + ["--finetune", finetune],
                         str(out / "logs"))
    assert code == 0, output[-3000:] + worker_log(str(out / "logs"), 0)[-3000:]
    return out


@pytest.fixture(scope="module")
def ranks(launch):
    return [dict(np.load(launch / f"rank{rank}.npz")) for rank in (0, 1)]


def test_every_rank_computes_the_same(ranks):
    first, second = ranks
    assert sorted(first) == sorted(second)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)


@pytest.mark.parametrize("case", CASES)
def test_split_logits_match_the_single_process(ranks, case):
    result = ranks[0]
    prompts = [k.split("/")[1] for k in result if k.startswith(case + "/") and k.endswith("/split/logits")]
    assert prompts
    for prompt in prompts:
        whole, split = result[f"{case}/{prompt}/whole/logits"], result[f"{case}/{prompt}/split/logits"]
        np.testing.assert_allclose(split, whole, atol=1e-5, rtol=0, err_msg=f"{case} {prompt}")
        np.testing.assert_array_equal(result[f"{case}/{prompt}/split/generated"],
                                      result[f"{case}/{prompt}/whole/generated"], err_msg=f"{case} {prompt}")


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_split_greedy_tokens_match_the_reference(ranks, case):
    for prompt in GOLDEN_CASES[case]:
        np.testing.assert_array_equal(ranks[0][f"{case}/{prompt}/split/generated"], ranks[0][f"{case}/{prompt}/golden"],
                                      err_msg=f"{case} {prompt}")


def test_kv_cache_holds_each_ranks_kv_heads(ranks):
    # ChatGLM-6B: 4 heads -> 2 per rank; ChatGLM2: 2 groups -> 1 per rank; ChatGLM3: 1 group, replicated
    assert {case: int(ranks[0][f"{case}/cache_heads"]) for case in ("chatglm", "chatglm2", "chatglm3")} == \
        {"chatglm": 2, "chatglm2": 1, "chatglm3": 1}


def test_unseeded_sampling_agrees_across_ranks(ranks):
    for case in CASES:
        sampled = ranks[0][f"{case}/sampled"]
        assert sampled.shape[1] == ranks[0][f"{case}/sampled_from"].shape[1] + 6
        np.testing.assert_array_equal(sampled, ranks[1][f"{case}/sampled"])


# ---------------------------------------------------------------------------------- bad input
def _config(**changes):
    sizes = dict(family="chatglm2", vocab_size=1000, hidden_size=64, num_layers=2, num_attention_heads=4,
                 kv_channels=16, multi_query_group_num=2, ffn_hidden_size=160, seq_length=64)
    return GLMConfig(**dict(sizes, **changes))


def test_tensor_parallel_must_divide_the_heads():
    from mindglm.parallel.sharding import check_tensor_parallel
    with pytest.raises(ConfigError, match=r"tensor_parallel 3 does not divide the model's 4 attention heads: "
                                          r"use one of 1, 2, 4"):
        check_tensor_parallel(_config(), 3)
    with pytest.raises(ConfigError, match="cannot share the model's 4 key/value groups"):
        check_tensor_parallel(_config(num_attention_heads=12, multi_query_group_num=4), 6)
    with pytest.raises(ConfigError, match="does not divide the MLP's 150 hidden units"):
        check_tensor_parallel(_config(ffn_hidden_size=150), 4)
    check_tensor_parallel(_config(), 4)   # 2 groups over 4 ranks: each pair of ranks shares one


def test_kv_groups_split_or_replicated():
    from mindglm.parallel.sharding import kv_groups_of
    assert [kv_groups_of(_config(), r, 2) for r in range(2)] == [(0, 1), (1, 1)]
    assert [kv_groups_of(_config(), r, 4) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert kv_groups_of(_config(multi_query_group_num=1), 1, 2) == (0, 1)


def test_tensor_parallel_outside_msrun_is_one_clear_error(monkeypatch):
    import mindglm
    for key in ("MS_ROLE", "MS_WORKER_NUM", "RANK_SIZE"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigError, match=r"not started by msrun: launch one process per device with msrun, "
                                          r"e.g. `msrun --worker_num=2"):
        mindglm.load_model(os.path.join(HERE, "fixtures", "models", "chatglm2-tiny"), tensor_parallel=2)


def test_world_size_must_equal_tensor_parallel(monkeypatch):
    import mindglm
    monkeypatch.setenv("MS_ROLE", "MS_WORKER")
    monkeypatch.setenv("MS_WORKER_NUM", "4")
    with pytest.raises(ConfigError, match=r"tensor_parallel is 2 but msrun started 4 processes: pass "
                                          r"--worker_num=2 --local_worker_num=2 to msrun"):
        mindglm.load_model(os.path.join(HERE, "fixtures", "models", "chatglm2-tiny"), tensor_parallel=2)


def test_ptuning_with_tensor_parallel_is_one_clear_error():
    import mindglm
    case = os.path.join(HERE, "fixtures", "adapters", "ptuning", "chatglm2-ptuning")
    with pytest.raises(ConfigError, match=r"P-Tuning prefixes are not split across ranks; run a P-Tuning model "
                                          r"with tensor_parallel 1"):
        mindglm.load_model(os.path.join(case, "base"), adapter=os.path.join(case, "prefix"), tensor_parallel=2)


def test_yaml_parallel_section(tmp_path):
    from mindglm.yaml_config import load_run_config
    path = tmp_path / "run.yaml"
    checkpoint = f"checkpoint: {os.path.join(HERE, 'fixtures', 'models', 'chatglm2-tiny')}\n"
    path.write_text(checkpoint + "parallel:\n  tensor_parallel: 2\n")
    assert load_run_config(str(path)).parallel.tensor_parallel == 2
    path.write_text(checkpoint + "parallel:\n  tensor_parallel: 0\n")
    with pytest.raises(ConfigError, match=r"key 'parallel.tensor_parallel' must be a positive integer, got 0"):
        load_run_config(str(path))


@pytest.mark.parametrize("family", ["chatglm", "chatglm2", "chatglm3"])
def test_lora_on_a_share_is_the_share_of_the_adapted_layer(family):
    """Rank r's share with the adapter merged (or its slices of A and B beside it) is rank r's cut
    of the whole adapted layer: column-parallel layers cut B's rows, row-parallel ones A's columns."""
    from mindglm.adapters import apply_lora
    from mindglm.loading import build_loaded_network
    from mindglm.parallel.context import ParallelContext
    case = os.path.join(HERE, "fixtures", "adapters", "lora", f"{family}-lora")
    config = GLMConfig.from_thudm(os.path.join(case, "base"))
    whole, _ = build_loaded_network(config, os.path.join(case, "base"))
    targets = apply_lora(whole, config, os.path.join(case, "adapter"))
    full = {path: cell.weight.asnumpy() for path, cell in whole.cells_and_names() if path in targets}
    kinds = set()
    for rank in (0, 1):
        for merge in (True, False):
            share, _ = build_loaded_network(config, os.path.join(case, "base"), ParallelContext(rank, 2, 0))
            assert apply_lora(share, config, os.path.join(case, "adapter"), merge) == targets
            cells = dict(share.cells_and_names())
            for path in targets:
                local = cells[path].local
                if merge:
                    weight = local.weight.asnumpy()
                else:   # W_r + (B_r A_r) * scaling, the LoRALinear's sum
                    weight = local.base.weight.asnumpy() + \
                        local.lora_b.asnumpy() @ local.lora_a.asnumpy() * np.float32(local.scaling)
                np.testing.assert_allclose(weight, cells[path].shards["weight"].take(full[path], path),
                                           atol=1e-6, rtol=0, err_msg=f"{path} rank {rank} merge {merge}")
                kinds.add(type(cells[path]).__name__)
    assert "ColumnParallelLinear" in kinds and (family == "chatglm" or "RowParallelLinear" in kinds)


def test_a_share_is_read_memory_mapped_from_bin_and_safetensors(tmp_path):
    """A rank loading from .bin shards or a .safetensors model maps each tensor (reading only what
    it keeps) and gets the share it gets from reading every tensor whole."""
    from mindglm.io.safetensors_io import write_safetensors
    from mindglm.io.sources import list_tensors
    from mindglm.io.tensors import LazyTensor
    from mindglm.loading import build_loaded_network
    from mindglm.parallel.context import ParallelContext
    source = os.path.join(HERE, "fixtures", "models", "chatglm2-tiny")
    tensors = list_tensors(source)
    write_safetensors(str(tmp_path / "model.safetensors"), [(t.name, t.shape, t.dtype.name) for t in tensors],
                      (t.load() for t in tensors))
    shutil.copy(os.path.join(source, "config.json"), tmp_path)
    config = GLMConfig.from_thudm(source)
    mapped = []
    original = LazyTensor.mapped

    def counting(self):
        array = original(self)
        if isinstance(array, np.memmap):
            mapped.append(self.name)
        return array
    try:
        for rank in (0, 1):
            context = ParallelContext(rank, 2, 0)
            LazyTensor.mapped = LazyTensor.load
            whole = {name: p.asnumpy() for name, p in build_loaded_network(config, source, context)[0]
                     .parameters_and_names()}
            LazyTensor.mapped = counting
            for src in (source, str(tmp_path)):
                del mapped[:]
                network, _ = build_loaded_network(config, src, context)
                # every tensor but the rotary buffer mindglm recomputes
                assert sorted(mapped) == sorted(t.name for t in tensors
                                                if not t.name.endswith("rotary_pos_emb.inv_freq")), src
                for name, param in network.parameters_and_names():
                    np.testing.assert_array_equal(param.asnumpy(), whole[name], err_msg=f"{name} rank {rank} {src}")
    finally:
        LazyTensor.mapped = original


# ---------------------------------------------------------------------------------- data parallel
def finetune_config(where):
    """A LoRA run of 3 updates, one example per micro-batch, evaluated at step 2 (tests/test_finetune.py's)."""
    from test_finetune import _config
    where.mkdir()
    return _config(where, "lora", max_steps=3, save_steps=0, warmup_steps=0, per_device_train_batch_size=1,
                   gradient_accumulation_steps=1)


def adapter_arrays(run_dir):
    from mindglm.io.sources import list_tensors
    from mindglm.io.tensors import to_numpy
    path = os.path.join(run_dir, "out", "checkpoint-3", "adapter", "adapter_model.safetensors")
    return {t.name: to_numpy(t.load()) for t in list_tensors(path)}


def test_data_parallel_finetuning_equals_one_process_with_the_same_global_batch(launch, tmp_path):
    """2 workers x 1 micro-batch per step = one process accumulating 2: the same examples per
    step, the same losses, the same adapter; rank 0 alone writes the log and the checkpoint."""
    from test_finetune import _log, finetune
    single = tmp_path / "single"
    config = finetune_config(single)
    assert finetune.main(["--config", config, "--set", "train.gradient_accumulation_steps=2"]) == 0
    expected, got = _log(single), _log(launch / "dp")
    assert [r["step"] for r in got] == [1, 2, 3] and "eval_loss" in got[1]
    for mine, theirs in zip(got, expected):
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (mine, theirs)
    assert sorted(os.listdir(launch / "dp" / "out")) == ["checkpoint-3", "train_log.jsonl"]
    trained, reference = adapter_arrays(launch / "dp"), adapter_arrays(single)
    assert sorted(trained) == sorted(reference)
    for name in reference:
        np.testing.assert_allclose(trained[name], reference[name], atol=1e-5, rtol=0, err_msg=name)
