"""The front ends under msrun with tensor_parallel 2 (rank 0 does the file / console work, rank
1 follows its engine), and a rank that dies, under a front end or in a plain SPMD script: one
clear error on rank 0, no worker left behind."""
import json
import os
import time

import pytest

pytest.importorskip("mindspore")

from test_tensor_parallel import HERE, ROOT, msrun, worker_log  # noqa: E402

E2E = os.path.join(HERE, "fixtures", "chat", "chatglm3-e2e")
CONFIG = os.path.join(ROOT, "configs", "tiny", "chatglm3_e2e.yaml")


def test_batch_infer_under_msrun_gives_the_reference_replies(tmp_path):
    with open(os.path.join(E2E, "chat_golden.json"), encoding="utf-8") as handle:
        cases = json.load(handle)
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": c["query"], "history": c["history"]},
                                         ensure_ascii=False) + "\n" for i, c in enumerate(cases)), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    code, output = msrun([os.path.join(ROOT, "tools", "batch_infer.py"), "--config", CONFIG, "--input", str(source),
                          "--output", str(out), "--set", "parallel.tensor_parallel=2"], str(tmp_path / "logs"),
                         timeout=600)
    assert code == 0, output[-3000:]
    answers = {r["id"]: r for r in map(json.loads, out.read_text(encoding="utf-8").splitlines())}
    assert len(answers) == len(cases)            # written once, by rank 0 only
    for i, case in enumerate(cases):
        assert answers[i]["response"] == case["response"], i


def test_run_chat_under_msrun_replies_on_rank_0(tmp_path):
    with open(os.path.join(E2E, "chat_golden.json"), encoding="utf-8") as handle:
        first = json.load(handle)[0]
    assert first["history"] == []
    stdin = tmp_path / "stdin.txt"
    stdin.write_text(first["query"] + "\n", encoding="utf-8")
    with open(stdin, encoding="utf-8") as handle:
        code, output = msrun([os.path.join(ROOT, "run_chat.py"), "--config", CONFIG, "--set",
                              "parallel.tensor_parallel=2"], str(tmp_path / "logs"), timeout=600, stdin=handle)
    assert code == 0, output[-3000:]
    assert first["response"] in worker_log(str(tmp_path / "logs"), 0)
    assert first["response"] not in worker_log(str(tmp_path / "logs"), 1)


@pytest.mark.parametrize("script", ["front_end", "spmd"])
def test_a_rank_that_dies_is_one_error_on_rank_0(tmp_path, script):
    start = time.monotonic()
    # MS_NODE_TIMEOUT: msrun's scheduler waits that long (30 s by default) for the ranks rank 0
    # stopped before it ends the launch; the error itself comes at once
    code, output = msrun([os.path.join(HERE, "tp_dies.py"), script], str(tmp_path / "logs"), timeout=300,
                         env={"MS_NODE_TIMEOUT": "6"})
    assert code != 0
    lead = worker_log(str(tmp_path / "logs"), 0)
    assert lead.count("error: rank 1 of 2 failed: it stopped without a word (killed?)") == 1, lead[-2000:]
    assert "rank 1's own log (worker_1.log in msrun's --log_dir) says why" in lead
    assert "finished" not in lead
    assert time.monotonic() - start < 300
