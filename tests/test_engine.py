"""The engine: per-row KV cache slots, chunked prefill, sequences joining and leaving a running
batch, compile counts, re-entrant chat, bad input."""
import numpy as np
import pytest

from conftest import FIXTURES, golden, load_converted, model_dir
from mindglm.engine import Engine, EngineConfig, PromptTooLong, QueueFull
from mindglm.generation.config import GenerationConfig
from mindglm.engine.model_runner import ModelRunner
from mindglm.engine.scheduler import DecodeRow, PrefillChunk, StepPlan

ATOL = 1e-4
GREEDY = GenerationConfig(eos_token_id=-1)


@pytest.fixture(scope="module")
def small_engine_models(tmp_path_factory):
    """Models of their own (each ModelRunner owns its network's caches) with a small engine:
    3 rows, 64-token chunks, so tests reach chunking, row buckets and window buckets quickly."""
    out = tmp_path_factory.mktemp("engine")
    models = {}
    for name in ("chatglm-tiny", "chatglm2-tiny", "chatglm3-tiny"):
        model = load_converted(model_dir(name), str(out / f"{name}.ckpt"))
        model.engine_config = EngineConfig(max_num_seqs=3, chunk_size=64)
        models[name] = model
    return models


def _expected_new(ref, case):
    return ref[f"{case}_generated"][:, ref[f"{case}_input_ids"].shape[1]:]


def _real(ref, case, row):
    ids = ref[f"{case}_input_ids"][row]
    mask = ref.get(f"{case}_attention_mask")
    return ids if mask is None else ids[mask[row] > 0]


def _run(engine, seqs):
    engine.run_until_done(seqs)
    return [seq.output_ids for seq in seqs]


@pytest.mark.parametrize("name", ["chatglm-tiny", "chatglm2-tiny", "chatglm3-tiny"])
def test_sequences_joining_and_leaving_a_running_batch_match_the_goldens(small_engine_models, name):
    """Golden prompts enter one by one while others decode; short ones leave early; each gets
    exactly the reference's greedy tokens."""
    ref = golden(name)
    engine = small_engine_models[name].engine
    cases = [("single", 0), ("mask", 0)] if name == "chatglm-tiny" else [("single", 0), ("batch", 0), ("batch", 1)]
    expected = [_expected_new(ref, case)[row] for case, row in cases]
    first = engine.add_request(_real(ref, *cases[0]), GenerationConfig(eos_token_id=-1, max_new_tokens=len(expected[0])))
    for _ in range(3):
        engine.step()
    assert len(first.output_ids) == 3
    joined = []
    for (case, row), new in zip(cases[1:], expected[1:]):
        # the later ones stop early: they leave the batch while the first one goes on
        budget = len(new) // 2
        joined.append((engine.add_request(_real(ref, case, row), GenerationConfig(eos_token_id=-1, max_new_tokens=budget)),
                       new[:budget]))
        engine.step()
    engine.run_until_done([first] + [seq for seq, _ in joined])
    assert first.output_ids == list(expected[0]) and first.finish_reason == "length"
    for seq, new in joined:
        assert seq.output_ids == list(new)
    assert engine.stats()["rows_in_use"] == 0


@pytest.mark.parametrize("name", ["chatglm-tiny", "chatglm2-tiny", "chatglm3-tiny"])
def test_cache_reads_and_writes_give_the_reference_logits_at_every_position(small_engine_models, name):
    """The prompt goes in as a one-token prefill and then one decode row per token: the logits
    at every position equal the golden (full-sequence) logits, so every slot is written and read
    where it should be."""
    ref = golden(name)
    model = small_engine_models[name]
    runner = model.engine.runner
    assert isinstance(runner, ModelRunner)
    ids = ref["single_input_ids"][0]
    positions, context = model.engine.family.prepare_positions(model.config, ids[None])
    context = int(context[0])
    if context > 1:                              # GLM v1: the bidirectional context goes in whole
        plan = StepPlan(prefill=[PrefillChunk("p", 2, 0, list(ids[:context]), positions[0][:, :context], context, True)])
        got = [runner.execute(plan)["p"]]
        start = context
    else:
        plan = StepPlan(prefill=[PrefillChunk("p", 2, 0, [int(ids[0])], positions[0][:, :1], 0, True)])
        got = [runner.execute(plan)["p"]]
        start = 1
    for slot in range(start, len(ids)):
        row = DecodeRow("p", 2, int(ids[slot]), positions[0][:, slot], slot, context)
        got.append(runner.execute(StepPlan(decode=[row]))["p"])
    np.testing.assert_allclose(np.stack(got), ref["single_logits"][0, start - 1:], atol=ATOL, rtol=0)


def test_chunked_prefill_of_a_long_prompt_equals_the_exact_path(small_engine_models):
    """A 150-token prompt is prefilled in 64-token chunks (3 steps) next to a decoding sequence;
    its tokens and its first logits equal the no-cache path's."""
    model = small_engine_models["chatglm3-tiny"]
    rng = np.random.default_rng(5)
    prompt = rng.integers(3, 990, size=150)
    exact = model.generate(prompt[None], max_new_tokens=6, eos_token_id=-1, use_past=False)[0, 150:]
    engine = model.engine
    other = engine.add_request(rng.integers(3, 990, size=10), GenerationConfig(eos_token_id=-1, max_new_tokens=12))
    engine.step()
    long = engine.add_request(prompt, GenerationConfig(eos_token_id=-1, max_new_tokens=6))
    steps = 0
    while not long.output_ids:
        engine.step()
        steps += 1
    assert steps == 3                                  # ceil(150 / 64) chunks, one per step
    assert len(other.output_ids) >= 4                  # the running sequence kept decoding meanwhile
    engine.run_until_done([long, other])
    assert long.output_ids == list(exact)
    logits = model.logits(prompt[None])[0, -1]
    chunk_logits = engine.runner.execute(StepPlan(prefill=[
        PrefillChunk("x", 0, 0, list(prompt[:64]), np.arange(64)[None], 0, False),
        PrefillChunk("x", 0, 64, list(prompt[64:128]), np.arange(64, 128)[None], 0, False),
        PrefillChunk("x", 0, 128, list(prompt[128:]), np.arange(128, 150)[None], 0, True)]))["x"]
    np.testing.assert_allclose(chunk_logits, logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["chatglm-tiny", "chatglm2-tiny", "chatglm3-tiny"])
def test_prompts_arriving_together_prefill_in_one_packed_call(small_engine_models, name):
    """Prompts of one step share one prefill call (back to back in one row of tokens), yet each
    sees only its own keys: its logits equal the golden's (or, for random lengths, the exact
    no-cache forward of that prompt alone), and its greedy reply the golden's."""
    ref = golden(name)
    model = small_engine_models[name]
    engine = model.engine
    cases = [("single", 0), ("mask", 0)] if name == "chatglm-tiny" else [("single", 0), ("batch", 1)]
    prompts = [_real(ref, case, row) for case, row in cases]
    expected = [ref[f"{case}_logits"][row, -1] for case, row in cases]
    if name != "chatglm-tiny":             # a random length too, against the prompt alone
        prompt = np.random.default_rng(3).integers(3, 990, size=64 - sum(len(p) for p in prompts) - 3)
        prompts.append(prompt)
        expected.append(model.logits(prompt[None])[0, -1])
    new = 5
    seqs = [engine.add_request(p, GenerationConfig(eos_token_id=-1, max_new_tokens=new)) for p in prompts]
    plan = engine.scheduler.schedule()
    assert [c.request_id for c in plan.prefill] == [s.request_id for s in seqs]
    assert len(engine.runner.pack(plan.prefill)) == 1
    logits = engine.runner.execute(plan)
    for seq, want in zip(seqs, expected):
        np.testing.assert_allclose(logits[seq.request_id], want, atol=ATOL, rtol=0)
    for seq in seqs:                         # the plan was run outside step(): start them afresh
        engine.abort(seq.request_id)
    seqs = [engine.add_request(p, GenerationConfig(eos_token_id=-1, max_new_tokens=new)) for p in prompts]
    replies = _run(engine, seqs)
    for (case, row), reply in zip(cases, replies):
        assert reply == list(_expected_new(ref, case)[row][:new])
    for prompt, reply in zip(prompts[len(cases):], replies[len(cases):]):
        alone = model.generate(prompt[None], max_new_tokens=new, eos_token_id=-1, use_past=False)[0, len(prompt):]
        assert reply == list(alone)


def test_after_warmup_mixed_lengths_budgets_and_batch_sizes_compile_nothing(small_engine_models):
    model = small_engine_models["chatglm2-tiny"]
    engine = model.engine
    engine.warmup()
    assert set(engine.runner.reachable_shapes()) <= engine.runner.signatures
    assert engine.warmup() == 0                         # a second warm-up finds everything compiled
    before = engine.compiles
    rng = np.random.default_rng(1)
    seqs = []
    for length, budget in [(5, 3), (70, 40), (200, 2), (17, 120), (33, 7), (140, 30), (1, 1), (90, 150)]:
        seqs.append(engine.add_request(rng.integers(3, 990, size=length),
                                       GenerationConfig(eos_token_id=-1, max_new_tokens=budget)))
        engine.step()
    engine.run_until_done(seqs)
    # batch sizes 1..3 and windows up to 256 were all reached
    assert engine.compiles == before, "a graph compiled after warm-up"
    assert [len(seq.output_ids) for seq in seqs] == [3, 40, 2, 120, 7, 30, 1, 150]


def test_thudm_default_budget_compiles_per_bucket_not_per_prompt(converted_models):
    """With max_length = the context (what THUDM's chat() uses), prompts of other lengths in one
    bucket reuse the same graphs, and decode attends to a window that follows the row."""
    model = converted_models["chatglm2-tiny"]
    engine = model.engine
    rng = np.random.default_rng(0)
    model.generate(rng.integers(3, 900, size=(1, 20)), max_length=model.config.seq_length, max_new_tokens=4,
                   eos_token_id=-1)
    compiled = set(engine.runner.signatures)
    model.generate(rng.integers(3, 900, size=(1, 37)), max_length=model.config.seq_length, eos_token_id=-1,
                   max_new_tokens=4)
    assert engine.runner.signatures == compiled
    assert {(1, 64, 64, 1), (1, 1, 64, 1)} <= compiled    # one prefill bucket, a window that fits the row (1 step a call)


def test_interleaved_stream_chats_on_one_model_equal_their_solo_replies():
    """Two conversations streamed on one model, advanced alternately, each end with the reply it
    gives alone (the chat goldens)."""
    import json
    import os
    from conftest import reference_chat
    model, tokenizer, settings, _ = reference_chat(os.path.join(os.path.dirname(FIXTURES), "..", "configs", "tiny",
                                                                "chatglm2_e2e.yaml"))
    with open(os.path.join(FIXTURES, "chat", "chatglm2-e2e", "chat_golden.json"), encoding="utf-8") as fh:
        cases = json.load(fh)
    a, b = cases[0], cases[1]
    streams = [model.stream_chat(tokenizer, case["query"], [tuple(t) for t in case.get("history", [])],
                                 max_length=128) for case in (a, b)]
    finals = [None, None]
    active = [True, True]
    while any(active):
        for i, stream in enumerate(streams):
            if active[i]:
                try:
                    finals[i] = next(stream)
                except StopIteration:
                    active[i] = False
    assert finals[0][0] == a["response"] and finals[1][0] == b["response"]
    assert model.engine.stats()["rows_in_use"] == 0


def test_an_abandoned_stream_frees_its_row():
    import os
    from conftest import reference_chat
    model, tokenizer, _, _ = reference_chat(os.path.join(os.path.dirname(FIXTURES), "..", "configs", "tiny",
                                                         "chatglm3_e2e.yaml"))
    stream = model.stream_chat(tokenizer, "你好", max_length=128)
    next(stream)
    assert model.engine.stats()["rows_in_use"] == 1
    stream.close()
    assert model.engine.stats()["rows_in_use"] == 0


def test_sampling_settings_and_seeds_are_per_sequence(small_engine_models):
    model = small_engine_models["chatglm3-tiny"]
    engine = model.engine
    prompt = golden("chatglm3-tiny")["single_input_ids"][0]
    sampled = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, seed=3, eos_token_id=-1, max_new_tokens=12)
    penalised = GenerationConfig(repetition_penalty=1.7, eos_token_id=-1, max_new_tokens=12)
    greedy = GenerationConfig(eos_token_id=-1, max_new_tokens=12)
    alone = [_run(engine, [engine.add_request(prompt, config)])[0] for config in (sampled, penalised, greedy)]
    together = _run(engine, [engine.add_request(prompt, config) for config in (sampled, penalised, greedy)])
    assert together == alone
    assert alone[0] != alone[2] and alone[1] != alone[2]   # the settings did change something


def test_finish_reasons_and_abort(small_engine_models):
    model = small_engine_models["chatglm2-tiny"]
    engine = model.engine
    ref = golden("chatglm2-tiny")
    prompt = ref["single_input_ids"][0]
    first = int(_expected_new(ref, "single")[0, 0])
    second = int(_expected_new(ref, "single")[0, 1])
    stop = engine.add_request(prompt, GenerationConfig(max_new_tokens=5), stop_ids=[first])
    tool = engine.add_request(prompt, GenerationConfig(max_new_tokens=5), stop_ids=[second], tool_call_ids=[second])
    length = engine.add_request(prompt, GenerationConfig(max_new_tokens=2, eos_token_id=-1))
    engine.run_until_done([stop, tool, length])
    assert (stop.finish_reason, stop.output_ids) == ("stop", [first])
    assert (tool.finish_reason, tool.output_ids) == ("tool_calls", [first, second])
    assert (length.finish_reason, len(length.output_ids)) == ("length", 2)
    seen = []
    aborted = engine.add_request(prompt, GREEDY, listener=lambda seq, new: seen.append((list(new), seq.finish_reason)))
    engine.step()
    assert engine.stats()["rows_in_use"] == 1
    engine.abort(aborted.request_id)
    assert aborted.finish_reason == "abort" and engine.stats()["rows_in_use"] == 0
    assert seen[-1] == ([], "abort") and len(seen) == 2


def test_budget_rules_and_queue_bound(small_engine_models):
    model = small_engine_models["chatglm2-tiny"]
    engine = model.engine
    room = engine.max_model_len
    with pytest.raises(PromptTooLong, match=f"maximum context length is {room} tokens. However, you requested "
                                            f"{room + 1} tokens \\(10 in the messages, {room - 9} in the completion\\)"):
        engine.add_request(list(range(3, 13)), GenerationConfig(max_new_tokens=room - 9))
    capped = engine.add_request(list(range(3, 13)), GenerationConfig(max_length=10 * room, eos_token_id=-1))
    assert capped.capped and capped.max_tokens == room - 10
    engine.abort(capped.request_id)
    unbounded = engine.add_request(list(range(3, 13)), GenerationConfig())
    assert unbounded.max_tokens == room - 10 and not unbounded.capped
    engine.abort(unbounded.request_id)
    # an exact-path engine of its own (it attaches no caches), one row and room for one waiting request
    queued = Engine(model.network, model.config, EngineConfig(max_num_seqs=1, max_waiting=1), use_past=False)
    queued.add_request([5, 6], GREEDY)
    with pytest.raises(QueueFull, match="already waiting"):
        queued.add_request([5, 6], GREEDY)


@pytest.mark.parametrize("use_past", [True, False], ids=["kv_cache", "no_cache"])
def test_bad_ids_are_clear_errors_and_leave_the_model_usable(small_engine_models, use_past):
    model = small_engine_models["chatglm2-tiny"]
    ref = golden("chatglm2-tiny")
    prompt, expected = ref["single_input_ids"], ref["single_generated"]
    budget = expected.shape[1] - prompt.shape[1]
    for bad, message in [([[1, 70000]], "token id 70000, outside the model's vocabulary"),
                         ([[1, -5]], "token id -5"), ([[1.5, 2]], "must be integers"),
                         ([[]], "is empty"), (np.zeros((0, 3), int), "at least one row")]:
        with pytest.raises(ValueError, match=message):
            model.generate(bad, max_new_tokens=2, use_past=use_past)
    out = model.generate(prompt, max_new_tokens=budget, eos_token_id=-1, use_past=use_past)
    np.testing.assert_array_equal(out, expected)


def test_a_failed_graph_call_leaves_the_model_usable(small_engine_models, tmp_path, monkeypatch):
    """A graph that raised inside MindSpore (here: an id past the vocabulary slipped past the
    checks) is rebuilt: the next generation gives the golden tokens."""
    model = small_engine_models["chatglm3-tiny"]
    monkeypatch.chdir(tmp_path)
    ref = golden("chatglm3-tiny")
    prompt, expected = ref["single_input_ids"], ref["single_generated"]
    runner = model.engine.runner
    with pytest.raises(RuntimeError):
        runner.execute(StepPlan(prefill=[PrefillChunk("bad", 0, 0, [1, 70000], np.array([[0, 1]]), 0, True)]))
    out = model.generate(prompt, max_new_tokens=expected.shape[1] - prompt.shape[1], eos_token_id=-1)
    np.testing.assert_array_equal(out, expected)
