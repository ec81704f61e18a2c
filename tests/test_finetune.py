"""tools/finetune.py on the tiny ChatGLM3 e2e model: checkpoints that load with --adapter,
an exact resume (with dropout, and P-Tuning through THUDM's projection MLP), and --merge."""
import json
import os
import shutil
import sys

import numpy as np
import pytest
import yaml

import mindglm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import finetune  # noqa: E402

BASE = os.path.join(REPO, "configs", "tiny", "chatglm3_e2e.yaml")
TRAIN = [{"content": "类型#裙*颜色#红色", "summary": "红色的裙子"}, {"content": "类型#上衣", "summary": "一件上衣"},
         {"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好呀"}]}]


def _config(tmp_path, method, **train):
    data = tmp_path / "train.json"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in TRAIN), encoding="utf-8")
    settings = {"output_dir": str(tmp_path / "out"), "max_steps": 4, "save_steps": 2, "learning_rate": 5e-2,
                "lr_scheduler_type": "linear", "warmup_steps": 1, "eval_steps": 2, "seed": 1,
                "loss_scale_value": 1024, "loss_scale_window": 3}   # the scale grows at step 3: state to restore
    settings.update(train)
    # dropout on: a resume must regenerate the masks the uninterrupted run drew
    config = {"model": BASE, "method": method, "lora": {"r": 2, "lora_alpha": 4, "lora_dropout": 0.1,
                                                        "target_modules": ["query_key_value", "dense_h_to_4h"]},
              "ptuning": {"pre_seq_len": 2, "prefix_dropout": 0.1, "prefix_projection": True},
              "data": {"train_file": str(data), "validation_file": str(data)}, "train": settings}
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return str(path)


def _log(tmp_path):
    return [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["lora", "ptuning"])
def test_finetune_checkpoints_resume_exactly_and_load_as_adapters(tmp_path, method, capsys):
    config = _config(tmp_path, method)
    assert finetune.main(["--config", config]) == 0
    full = _log(tmp_path)
    assert [r["step"] for r in full] == [1, 2, 3, 4] and "eval_loss" in full[1]
    assert full[-1]["loss"] < full[0]["loss"]
    out = tmp_path / "out"
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-4"]
    with np.load(out / "checkpoint-4" / "trainer_state.npz") as state:
        uninterrupted = dict(state)
    assert uninterrupted["loss_scale"] == 2048 and uninterrupted["loss_scale_counter"] == 1
    # interrupted after step 2: resume gives the uninterrupted curve and end state
    shutil.rmtree(out / "checkpoint-4")
    (out / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in full[:2]))
    assert finetune.main(["--config", config, "--resume"]) == 0
    resumed = _log(tmp_path)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    with np.load(out / "checkpoint-4" / "trainer_state.npz") as state:
        assert sorted(state) == sorted(uninterrupted)
        for key in state:
            np.testing.assert_array_equal(state[key], uninterrupted[key], err_msg=key)
    # resuming under other adapter settings: one clear error
    other = "lora.r=3" if method == "lora" else "ptuning.prefix_projection=false"
    assert finetune.main(["--config", config, "--resume", "--set", other]) == 2
    assert "does not fit this run's" in capsys.readouterr().err
    # the checkpoint is an adapter: it changes the base model's logits
    adapter = str(out / "checkpoint-4" / "adapter")
    ids = np.array([[64790, 64792, 64795, 30910, 13, 36474, 64796]])
    tuned = mindglm.load_model(BASE, adapter=adapter).logits(ids)
    assert np.abs(tuned - mindglm.load_model(BASE).logits(ids)).max() > 1e-3
    if method == "lora":
        merged = str(tmp_path / "merged.ckpt")
        assert finetune.main(["--config", config, "--merge", merged, "--adapter", adapter]) == 0
        np.testing.assert_allclose(mindglm.load_model(BASE, checkpoint=merged).logits(ids), tuned, atol=1e-4, rtol=0)
        hf_dir = str(tmp_path / "merged-hf")
        assert finetune.main(["--config", config, "--merge", hf_dir, "--adapter", adapter, "--to-hf"]) == 0
        np.testing.assert_allclose(mindglm.load_model(hf_dir).logits(ids), tuned, atol=1e-4, rtol=0)


def test_finetune_config_errors_are_one_line(tmp_path, capsys):
    config = _config(tmp_path, "lora")
    assert finetune.main(["--config", config, "--set", "train.max_stepz=3"]) == 2
    assert "unknown key 'train.max_stepz'" in capsys.readouterr().err
    assert finetune.main(["--config", config, "--set", "lora.target_modules=[nope]"]) == 2
    assert "'nope' matches no layer" in capsys.readouterr().err
    assert finetune.main(["--config", config, "--set", "train.loss_scale_value=1024", "--set",
                          "train.loss_scale_factor=1.5"]) == 2
    assert "an integer loss_scale_factor >= 2" in capsys.readouterr().err
    assert finetune.main(["--config", config, "--set", "ptuning.prefix_projection=3"]) == 2
    assert "'ptuning.prefix_projection' must be true or false" in capsys.readouterr().err
    assert finetune.main(["--config", config, "--set", "lora.lora_dropout=1"]) == 2
    assert "'lora.lora_dropout' is a dropout probability in [0, 1)" in capsys.readouterr().err


def test_evaluate_scores_engine_replies_like_one_by_one_chat(tmp_path):
    pytest.importorskip("jieba")
    from mindglm.tuning.metrics import score
    from mindglm.yaml_config import load_run_config
    data = tmp_path / "dev.json"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in TRAIN), encoding="utf-8")
    out = tmp_path / "eval"
    import subprocess
    # a process of its own, as a user runs it: it sets the device context, which one test process can set only once
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "evaluate.py"), "--config", BASE, "--data",
                             str(data), "--output-dir", str(out), "--max-new-tokens", "6"], capture_output=True,
                            cwd=REPO, timeout=300, env={**os.environ, "GLOG_v": "3"})
    assert result.returncode == 0, result.stderr.decode()
    rows = [json.loads(line) for line in (out / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()]
    run = load_run_config(BASE)
    model, tokenizer = mindglm.load_model(BASE), run.load_tokenizer()
    settings = {k: v for k, v in run.generation_settings.items() if k not in ("eos_token_id", "max_length")}
    queries = [(r["content"], []) if "content" in r else (r["conversations"][0]["content"], []) for r in TRAIN]
    from mindglm.chat import build_chat_ids, stop_token_ids
    stops = stop_token_ids(tokenizer, "chatglm3")
    for row, (query, history) in zip(rows, queries):    # one request at a time, cut at the first stop id
        prompt = build_chat_ids(tokenizer, "chatglm3", query, history)
        new = list(model.generate([prompt], max_new_tokens=6, eos_token_id=-1, **settings)[0, len(prompt):])
        new = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
        assert row["predict"] == tokenizer.decode(new, skip_special_tokens=True).strip()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == score([r["predict"] for r in rows], [r["labels"] for r in rows])
    assert [r["labels"] for r in rows] == ["红色的裙子", "一件上衣", "你好呀"]


def test_shipped_finetune_configs_load():
    import glob
    from mindglm.tuning.config import load_finetune_config
    paths = sorted(glob.glob(os.path.join(REPO, "configs", "*", "finetune_*.yaml")))
    assert len(paths) == 6
    for path in paths:
        cfg = load_finetune_config(path)
        assert os.path.isfile(cfg.model) and cfg.method in os.path.basename(path)
