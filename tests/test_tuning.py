"""Fine-tuning on the tiny models: data as the reference trainers build it, the loss and its
gradients (against numpy and central finite differences), AdamW against torch, and learning."""
import json
import math
import os

import numpy as np
import pytest
from mindspore import Tensor

import mindglm
from mindglm.adapters import LoRALinear
from mindglm.adapters.lora import add_lora
from mindglm.adapters.prefix import add_prefix, write_prefixes
from mindglm.adapters.save import save_lora, save_ptuning
from mindglm.tuning.data import DataConfig, DataError, Example, encode_record, read_examples
from mindglm.tuning.train import AdamW, OptimConfig, Trainer, clip_by_global_norm, collate, learning_rate
from conftest import FIXTURES, model_dir

CHAT = {f: os.path.join(FIXTURES, "chat", f"{f}-e2e") for f in ("chatglm", "chatglm2", "chatglm3")}


def tokenizer(family):
    from mindglm.tokenization import load_tokenizer
    return load_tokenizer(CHAT[family], family=family)


# ---------------------------------------------------------------------------------- data
def test_chatglm_ids_and_labels_follow_thudm_ptuning():
    tok = tokenizer("chatglm")
    ids, labels = encode_record(tok, "chatglm", {"content": "类型#裙", "summary": "这是一条裙子"}, DataConfig(), "x")
    a = tok.encode("类型#裙", add_special_tokens=False)
    b = tok.encode("这是一条裙子", add_special_tokens=False)
    assert ids == a + [tok.gmask_token_id, tok.sop_token_id] + b + [tok.eos_token_id]
    sop = ids.index(tok.sop_token_id)
    assert labels == [-100] * sop + ids[sop:]
    # truncation: a to max_source_length - 1, b to max_target_length - 2
    ids, _ = encode_record(tok, "chatglm", {"content": "类型#裙", "summary": "这是一条裙子"},
                           DataConfig(max_source_length=2, max_target_length=3), "x")
    assert ids == a[:1] + [tok.gmask_token_id, tok.sop_token_id] + b[:1] + [tok.eos_token_id]


def test_chatglm2_ids_and_labels_follow_thudm_ptuning():
    tok = tokenizer("chatglm2")
    record = {"q": "你好", "a": "你好呀", "h": [["在吗", "在"]]}
    data = DataConfig(prompt_column="q", response_column="a", history_column="h")
    ids, labels = encode_record(tok, "chatglm2", record, data, "x")
    prompt = "[Round 1]\n\n问：在吗\n\n答：在\n\n[Round 2]\n\n问：你好\n\n答："
    a = tok.encode(prompt, add_special_tokens=True)
    b = tok.encode("你好呀", add_special_tokens=False)
    assert ids == a + b + [tok.eos_token_id]
    assert labels == [-100] * len(a) + b + [tok.eos_token_id]


def test_chatglm3_conversations_learn_every_assistant_turn():
    tok = tokenizer("chatglm3")
    conversation = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
                    {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
                    {"role": "assistant", "content": "a2"}]
    ids, labels = encode_record(tok, "chatglm3", {"conversations": conversation}, DataConfig(), "x")

    def message(role, content):
        return [tok.role_token_id(role)] + tok.encode_plain("\n") + tok.encode_plain(content)
    expected = [tok.gmask_token_id, tok.sop_token_id]
    learnt = []
    for m in conversation:
        part = message(m["role"], m["content"])
        expected += part
        learnt += [m["role"] == "assistant"] * len(part)
    expected.append(tok.eos_token_id)
    assert ids == expected
    # finetune_hf.py: token i is learnt when token i-1 is in an assistant message
    flags = [False, False] + learnt
    assert labels == [-100] + [t if flags[i - 1] else -100 for i, t in enumerate(ids) if i > 0]
    u2 = ids.index(tok.role_token_id("user"), 3 + len(message("system", "s")) + len(message("user", "u1")))
    assert labels[u2] == tok.role_token_id("user")       # the end of a1 is learnt: hand the turn back
    assert labels[-1] == tok.eos_token_id


def test_bad_lines_are_reported_by_number(tmp_path):
    tok = tokenizer("chatglm2")
    path = tmp_path / "train.json"
    path.write_text('{"content": "a", "summary": "b"}\n{"prompt": "a"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train.json:2: no text column 'content' \(the line has: prompt\)"):
        read_examples(str(path), tok, "chatglm2", DataConfig())
    path.write_text('{"content": "a", "summary": "b"}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train.json:2: not a JSON object"):
        read_examples(str(path), tok, "chatglm2", DataConfig())
    path.write_text('{"content": "a long prompt", "summary": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train.json:1: no token is left to learn after truncation"):
        read_examples(str(path), tokenizer("chatglm3"), "chatglm3", DataConfig(max_source_length=3,
                                                                                max_target_length=0))
    path.write_text('{"conversations": [{"role": "user", "content": "a"}]}\n', encoding="utf-8")
    with pytest.raises(DataError, match="conversations form is ChatGLM3's"):
        read_examples(str(path), tok, "chatglm2", DataConfig())


# ---------------------------------------------------------------------------------- loss and grads
def _examples(config):
    """Two short examples with a learnable tail, in the family's special-token layout."""
    if config.family == "chatglm":
        a, b = [5, 6, 7, 8], [11, 12, 13]
        ids = a + [config.gmask_token_id, config.bos_token_id] + b + [config.eos_token_ids[0]]
        second = [9, 10] + [config.gmask_token_id, config.bos_token_id] + [21, 22] + [config.eos_token_ids[0]]
        return [Example(ids, [-100] * 5 + ids[5:], 1), Example(second, [-100] * 3 + second[3:], 2)]
    ids, second = [5, 6, 7, 8, 9, 11, 12, 13, 2], [30, 31, 21, 22, 2]
    return [Example(ids, [-100] * 5 + ids[5:], 1), Example(second, [-100] * 2 + second[2:], 2)]


def _reference_loss(model, batch):
    """torch's shifted CrossEntropyLoss(ignore_index=-100) on the no-cache logits, in numpy float64."""
    logits = model.logits(batch["input_ids"], attention_mask=batch["key_valid"]).astype(np.float64)
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1]
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    keep = labels != -100
    picked = np.take_along_axis(log_probs, np.where(keep, labels, 0)[..., None], -1)[..., 0]
    return -(picked * keep).sum() / keep.sum()


def _adapted(family, kind, seed=0):
    """A tiny model with a fresh adapter; P-Tuning's encoder (kind "projection": with THUDM's
    MLP) on `model.prefix_encoder`."""
    model = mindglm.load_model(model_dir(f"{family}-tiny"))
    model.prefix_encoder = None
    if kind == "lora":
        add_lora(model.network, model.config, ["query_key_value", "dense_4h_to_h"], 4, 8, seed=seed)
        rng = np.random.default_rng(seed + 1)           # B != 0, so the LoRA branch matters
        for _, cell in model.network.cells_and_names():
            if isinstance(cell, LoRALinear):
                cell.lora_b.set_data(Tensor(rng.normal(0, 0.05, cell.lora_b.shape).astype(np.float32)))
    else:
        model.prefix_encoder = add_prefix(model.network, model.config, 3, seed=seed, projection=kind == "projection")
    return model


@pytest.mark.parametrize("family,kind", [("chatglm", "lora"), ("chatglm", "ptuning"), ("chatglm", "projection"),
                                         ("chatglm2", "lora"), ("chatglm2", "ptuning")])
def test_loss_and_gradients(family, kind, tmp_path):
    """The loss equals the reference cross-entropy; the adapter's gradients equal central finite
    differences along random directions (left-padded right: two rows of different lengths). With
    the projection the parameters are the prefix encoder's, the prefixes its output."""
    model = _adapted(family, kind)
    encoder = model.prefix_encoder
    trainer = Trainer(model.network, model.config, OptimConfig(), 10, prefix_encoder=encoder)
    batch = collate(_examples(model.config), model.config)
    loss, grads = trainer.loss_and_grads(batch)
    assert abs(loss - _reference_loss(model, batch)) < 1e-5
    values = [p.asnumpy().astype(np.float64) for p in trainer.params]
    rng = np.random.default_rng(3)
    for _ in range(2):
        direction = [rng.standard_normal(v.shape) for v in values]
        norm = math.sqrt(sum(float((d * d).sum()) for d in direction))
        direction = [d / norm for d in direction]
        analytic = sum(float((grads[n] * d).sum()) for n, d in zip(trainer.names, direction))
        eps = 1e-2
        sides = []
        for sign in (1, -1):
            _set(trainer, model, [v + sign * eps * d for v, d in zip(values, direction)])
            sides.append(_reference_loss(model, batch))
        _set(trainer, model, values)
        numeric = (sides[0] - sides[1]) / (2 * eps)
        assert abs(analytic - numeric) < 2e-3 + 0.02 * abs(numeric), (analytic, numeric)
    trained = {id(p) for p in trainer.leaves}
    assert all(not p.requires_grad for p in model.network.get_parameters() if id(p) not in trained)
    assert len(trained) == (4 if kind == "lora" else 2) * model.config.num_layers
    if kind == "projection":
        assert trainer.names == ["embedding.weight", "trans.0.weight", "trans.0.bias", "trans.2.weight",
                                 "trans.2.bias"]
        # trained a little, saved in THUDM's format, reloaded with adapter=: the trained model's logits
        before = model.logits(batch["input_ids"])
        for _ in range(2):
            trainer.train_step([batch])
        out = str(tmp_path / "prefix")
        save_ptuning(encoder, out, json.load(open(os.path.join(model_dir(f"{family}-tiny"), "config.json"))))
        reloaded = mindglm.load_model(model_dir(f"{family}-tiny"), adapter=out)
        assert np.abs(model.logits(batch["input_ids"]) - before).max() > 1e-3
        np.testing.assert_array_equal(reloaded.logits(batch["input_ids"]), model.logits(batch["input_ids"]))


def _set(trainer, model, values):
    """Put `values` into the trained parameters (and, with an encoder, its output into the prefixes)."""
    for p, v in zip(trainer.params, values):
        p.set_data(Tensor(np.asarray(v, np.float32)))
    if model.prefix_encoder is not None:
        write_prefixes(model.network, model.prefix_encoder)


def test_loss_scaling_skips_overflow_and_otherwise_equals_fp32():
    """Dynamic loss scaling (the fp16/bf16 path, exercised in float32): an overflowing step
    changes nothing and halves the scale; a finite one makes exactly the float32 update (the
    scale is a power of two), and window finite steps in a row double the scale."""
    model = _adapted("chatglm2", "lora")
    batch = collate(_examples(model.config), model.config)
    optim = dict(lr_scheduler_type="constant")
    start = [p.asnumpy().copy() for p in model.network.trainable_params()]
    plain = Trainer(model.network, model.config, OptimConfig(**optim), 10)
    plain.train_step([batch])
    fp32 = [p.asnumpy().copy() for p in plain.params]
    _set(plain, model, start)

    scaled = Trainer(model.network, model.config, OptimConfig(loss_scale_value=2.0 ** 127, loss_scale_factor=2,
                                                              loss_scale_window=2, **optim), 10)
    result = scaled.train_step([batch])       # 2**127 times the gradients overflows float32
    assert result["skipped"] and scaled.adamw.step_count == 0 and scaled.step == 1
    for p, v in zip(scaled.params, start):
        np.testing.assert_array_equal(p.asnumpy(), v)
    assert float(scaled.scaler.scale_value.asnumpy()) == 2.0 ** 126

    from mindspore import ops
    ops.assign(scaled.scaler.scale_value, Tensor(np.float32(2.0 ** 10)))
    result = scaled.train_step([batch])
    assert not result["skipped"] and float(scaled.scaler.scale_value.asnumpy()) == 2.0 ** 10
    for p, v in zip(scaled.params, fp32):
        np.testing.assert_array_equal(p.asnumpy(), v)
    scaled.train_step([batch])
    assert float(scaled.scaler.scale_value.asnumpy()) == 2.0 ** 11      # 2 finite steps in a row
    state = scaled.state()
    assert state["loss_scale"] == 2.0 ** 11 and state["loss_scale_counter"] == 0


def test_float16_compute_with_loss_scaling():
    """The Ascend path run for real in float16 on CPU (tiny model): a scale of 2**24 overflows
    float16, the step is skipped and the scale halved; at 2**10 the unscaled float16 gradients
    are the float32 model's to float16 precision."""
    from mindglm.pipeline import load_run_model
    from mindglm.yaml_config import load_run_config
    base = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny",
                        "chatglm3_e2e.yaml")
    models = [load_run_model(load_run_config(base, [("model.model_config.compute_dtype", dtype)]))
              for dtype in ("float16", "float32")]
    for model in models:
        add_lora(model.network, model.config, ["query_key_value", "dense_4h_to_h"], 2, 4, seed=1)
        rng = np.random.default_rng(2)
        for _, cell in model.network.cells_and_names():
            if isinstance(cell, LoRALinear):
                cell.lora_b.set_data(Tensor(rng.normal(0, 0.1, cell.lora_b.shape).astype(np.float32)))
    half, full = models
    ids = [64790, 64792, 64795, 30910, 13, 36474, 64796, 30910, 13, 36474, 2]
    batch = collate([Example(ids, [-100] * 6 + ids[6:], 1)], half.config)
    trainer = Trainer(half.network, half.config, OptimConfig(loss_scale_value=2.0 ** 24), 10)
    start = [p.asnumpy().copy() for p in trainer.params]
    assert trainer.train_step([batch])["skipped"]
    assert float(trainer.scaler.scale_value.asnumpy()) == 2.0 ** 23
    for p, v in zip(trainer.params, start):
        np.testing.assert_array_equal(p.asnumpy(), v)
    from mindspore import ops
    ops.assign(trainer.scaler.scale_value, Tensor(np.float32(2.0 ** 10)))
    loss, grads = trainer.loss_and_grads(batch)
    reference_loss, reference = Trainer(full.network, full.config, OptimConfig(), 10).loss_and_grads(batch)
    assert abs(loss - reference_loss) < 1e-2
    for name, value in reference.items():
        # float16 rounding: ~2e-3 of the largest gradient measured
        np.testing.assert_allclose(grads[name], value, atol=1e-2 * np.abs(value).max(), rtol=0, err_msg=name)


def test_lora_dropout_masks_come_from_seed_and_step():
    """In training the LoRA branch sees x * mask with mask drawn from (seed, step, micro-batch)
    as torch's dropout scales it (keep / (1 - p)); in eval mode no mask."""
    from mindglm.adapters.dropout import draw_dropout_masks
    from mindglm.models.layers import Linear
    import mindspore as ms
    rng = np.random.default_rng(0)
    base = Linear(6, 5, False, ms.float32, ms.float32)
    w, a, b = rng.standard_normal((5, 6)), rng.standard_normal((2, 6)), rng.standard_normal((5, 2))
    base.weight.set_data(Tensor(w.astype(np.float32)))
    cell = LoRALinear(base, 2, 0.5, dropout=0.25)
    cell.lora_a.set_data(Tensor(a.astype(np.float32)))
    cell.lora_b.set_data(Tensor(b.astype(np.float32)))
    x = rng.standard_normal((2, 3, 6)).astype(np.float32)
    draw_dropout_masks([cell.dropout], 2, 3, seed=7, step=4, micro=1)
    keep = np.random.default_rng([7, 4, 1]).random((2, 3, 6)) < 0.75
    cell.set_train(True)
    expected = x @ w.T + ((x * keep / 0.75) @ a.T @ b.T) * 0.5
    np.testing.assert_allclose(cell(Tensor(x)).asnumpy(), expected, atol=1e-5, rtol=0)
    cell.set_train(False)
    np.testing.assert_allclose(cell(Tensor(x)).asnumpy(), x @ w.T + (x @ a.T @ b.T) * 0.5, atol=1e-5, rtol=0)


def test_the_compiled_train_step_applies_the_drawn_masks():
    """The trainer's compiled step runs in training mode whatever mode the network is in, so
    the masks it is given are the masks it uses: the same masks give the same loss, others not."""
    model = mindglm.load_model(model_dir("chatglm2-tiny"))
    add_lora(model.network, model.config, ["query_key_value"], 4, 8, lora_dropout=0.5, seed=0)
    for _, cell in model.network.cells_and_names():
        if isinstance(cell, LoRALinear):
            cell.lora_b.set_data(Tensor(np.full(cell.lora_b.shape, 0.1, np.float32)))
    trainer = Trainer(model.network, model.config, OptimConfig(), 10)
    batch = collate(_examples(model.config), model.config)
    losses = []
    for step in (0, 0, 1):
        trainer.step = step
        trainer._draw_masks(batch, 0)
        losses.append(trainer.loss_and_grads(batch)[0])
    assert losses[0] == losses[1] != losses[2]
    assert abs(trainer.evaluate([batch]) - losses[0]) > 1e-4       # eval mode: no dropout


# ---------------------------------------------------------------------------------- optimizer
def test_adamw_schedule_and_clipping_match_torch():
    torch = pytest.importorskip("torch")
    optim = OptimConfig(learning_rate=0.1, weight_decay=0.01, warmup_steps=2, lr_scheduler_type="cosine",
                        max_grad_norm=0.5)
    rng = np.random.default_rng(0)
    start = rng.standard_normal((3, 4)).astype(np.float32)
    grads = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(5)]
    ours = {"w": start.copy()}
    adamw = AdamW(["w"], optim)
    weight = torch.nn.Parameter(torch.tensor(start))
    reference = torch.optim.AdamW([weight], lr=0.1, weight_decay=0.01)
    from transformers import get_cosine_schedule_with_warmup
    schedule = get_cosine_schedule_with_warmup(reference, 2, 5)
    for step, g in enumerate(grads):
        assert abs(learning_rate(optim, step, 5) - schedule.get_last_lr()[0]) < 1e-12
        clipped = {"w": g.copy()}
        clip_by_global_norm(clipped, 0.5)
        adamw.update(ours, clipped, learning_rate(optim, step, 5))
        weight.grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_([weight], 0.5)
        reference.step()
        schedule.step()
        np.testing.assert_allclose(ours["w"], weight.detach().numpy(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------- learning
def _greedy_answer(model, example):
    context = next(i for i, label in enumerate(example.labels) if label != -100)
    prompt = example.input_ids[:context]
    out = model.generate(np.array([prompt]), max_new_tokens=len(example.input_ids) - context, eos_token_id=-1,
                         use_past=True)
    return list(out[0, context:])


@pytest.mark.parametrize("kind", ["lora", "ptuning"])
def test_tiny_model_learns_and_its_checkpoint_reloads_exactly(tmp_path, kind):
    family = "chatglm2"
    model = _adapted(family, kind)
    if kind == "lora":
        for _, cell in model.network.cells_and_names():
            if isinstance(cell, LoRALinear):
                cell.lora_b.set_data(Tensor(np.zeros(cell.lora_b.shape, np.float32)))  # peft's start
    examples = _examples(model.config)
    optim = OptimConfig(learning_rate=5e-2 if kind == "lora" else 1e-1, lr_scheduler_type="constant")
    trainer = Trainer(model.network, model.config, optim, 40, prefix_encoder=model.prefix_encoder)
    batch = collate(examples, model.config)
    first = trainer.evaluate([batch])
    for _ in range(40):
        trainer.train_step([batch])
    last = trainer.evaluate([batch])
    assert last < 0.2 * first, (first, last)
    for example in examples:
        assert _greedy_answer(model, example) == example.input_ids[len(example.input_ids) -
                                                                   len(_greedy_answer(model, example)):]
    # saved in the interchange format, reloaded with adapter=: the trained model's logits
    out = str(tmp_path / kind)
    base = json.load(open(os.path.join(model_dir(f"{family}-tiny"), "config.json")))
    if kind == "lora":
        from mindglm.adapters.lora import LoRAConfig
        save_lora(model.network, model.config, out, LoRAConfig(4, 8, ["query_key_value", "dense_4h_to_h"]))
    else:
        save_ptuning(model.prefix_encoder, out, base)
    reloaded = mindglm.load_model(model_dir(f"{family}-tiny"), adapter=out, merge_adapter=False)
    ids = batch["input_ids"][:1, : len(examples[0].input_ids)]
    np.testing.assert_array_equal(reloaded.logits(ids), model.logits(ids))
    if kind == "lora":
        merged = mindglm.load_model(model_dir(f"{family}-tiny"), adapter=out)
        np.testing.assert_allclose(merged.logits(ids), model.logits(ids), atol=1e-4, rtol=0)


def test_training_a_model_on_the_inference_kernels_is_one_clear_error():
    """The CPU kernels (int8 / int4 / fp16 weights, fused norms) have no gradient: MindSpore's own
    message would be "Primitive Custom's bprop not defined" at the first step. The model still works."""
    from mindglm.config import ConfigError
    model = mindglm.load_model(model_dir("chatglm2-tiny"), quantize="int8")
    encoder = add_prefix(model.network, model.config, 4)
    with pytest.raises(ConfigError, match="no gradient: fine-tune a float32 base model"):
        Trainer(model.network, model.config, OptimConfig(), 1, prefix_encoder=encoder)
    ids = np.array([[5, 6, 7, 8]])
    assert model.generate(ids, max_new_tokens=2, eos_token_id=-1).shape == (1, 6)
