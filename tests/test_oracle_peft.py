"""Optional oracle: one LoRA training step's loss and gradients equal peft's on transformers'
GlmForCausalLM with the same weights (ChatGLM2/3 network). GlmForCausalLM splits qkv into
q/k/v projections (a LoRA on the fused matrix has no split equivalent), so the adapted layers
are the attention output, the fused gate/up and the down projection. And the round trip: our
saved LoRA loads in peft, and peft's merge equals ours."""
import json
import os
import sys

import numpy as np
import pytest
from mindspore import Tensor

torch = pytest.importorskip("torch", reason="optional oracle: pip install torch==2.13.0 transformers peft")
pytest.importorskip("transformers", reason="optional oracle: pip install transformers")
peft = pytest.importorskip("peft", reason="optional oracle: pip install peft")

from mindglm.adapters import LoRALinear  # noqa: E402
from mindglm.adapters.lora import add_lora  # noqa: E402
from mindglm.config import GLMConfig  # noqa: E402
from mindglm.tuning.data import Example  # noqa: E402
from mindglm.tuning.train import OptimConfig, Trainer, collate  # noqa: E402
from test_oracle_transformers import glm_reference, random_weights  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# mindglm Linear -> GlmForCausalLM module (per layer)
HF_MODULE = {"attention.dense": "self_attn.o_proj", "mlp.up": "mlp.gate_up_proj", "mlp.down": "mlp.down_proj"}


@pytest.mark.parametrize("family,groups", [("chatglm2", 2), ("chatglm3", 1)])
def test_lora_step_equals_peft(family, groups):
    config = GLMConfig(family=family, vocab_size=96, hidden_size=32, num_layers=2, num_attention_heads=4,
                       kv_channels=8, multi_query_group_num=groups, ffn_hidden_size=48, seq_length=64,
                       layernorm_epsilon=1e-5, add_qkv_bias=True, add_bias_linear=False, rmsnorm=True,
                       tie_word_embeddings=False, eos_token_id=2, pad_token_id=0)
    model, weights = random_weights(config, seed=7)
    add_lora(model.network, config, ["dense", "dense_h_to_4h", "dense_4h_to_h"], 4, 8, seed=1)
    rng = np.random.default_rng(2)
    for _, cell in model.network.cells_and_names():
        if isinstance(cell, LoRALinear):  # B != 0 so that A's gradients are not zero
            cell.lora_b.set_data(Tensor(rng.normal(0, 0.1, cell.lora_b.shape).astype(np.float32)))
    reference = glm_reference(config, weights, rope_theta=10000.0)
    lora_config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(
        {m.rsplit(".", 1)[-1] for m in HF_MODULE.values()}))
    reference = peft.get_peft_model(reference, lora_config)
    for path, cell in model.network.cells_and_names():
        if isinstance(cell, LoRALinear):
            layer, local = path.split(".", 2)[1], path.split(".", 2)[2]
            hf = reference.base_model.model.model.layers[int(layer)].get_submodule(HF_MODULE[local])
            hf.lora_A["default"].weight.data = torch.from_numpy(cell.lora_a.asnumpy().copy())
            hf.lora_B["default"].weight.data = torch.from_numpy(cell.lora_b.asnumpy().copy())

    ids = [5, 6, 7, 8, 9, 11, 12, 13, 2]
    labels = [-100] * 5 + ids[5:]
    trainer = Trainer(model.network, config, OptimConfig(), 1)
    loss, grads = trainer.loss_and_grads(collate([Example(ids, labels, 1)], config))
    out = reference(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
    out.loss.backward()
    assert abs(loss - out.loss.item()) < 1e-5
    by_name = dict(zip(trainer.names, trainer.params))
    checked = 0
    for path, cell in model.network.cells_and_names():
        if not isinstance(cell, LoRALinear):
            continue
        layer, local = path.split(".", 2)[1], path.split(".", 2)[2]
        hf = reference.base_model.model.model.layers[int(layer)].get_submodule(HF_MODULE[local])
        for ours, theirs in ((cell.lora_a, hf.lora_A["default"]), (cell.lora_b, hf.lora_B["default"])):
            name = next(n for n, p in by_name.items() if p is ours)
            np.testing.assert_allclose(grads[name], theirs.weight.grad.numpy(), atol=1e-5, rtol=1e-4,
                                       err_msg=f"{family} {path}")
            checked += 1
    assert checked == 2 * 3 * config.num_layers


def _thudm_state(path):
    """{name: torch tensor} of a THUDM model dir's shards (.bin or .safetensors), read by torch."""
    from safetensors.torch import load_file
    index = next(f for f in os.listdir(path) if f.endswith(".index.json"))
    with open(os.path.join(path, index)) as fh:
        files = sorted(set(json.load(fh)["weight_map"].values()))
    state = {}
    for name in files:
        full = os.path.join(path, name)
        state.update(load_file(full) if name.endswith(".safetensors") else torch.load(full, weights_only=True))
    return state


def _linears(state, targets):
    """A torch module tree holding, under THUDM's module names, an nn.Linear per targeted matrix:
    all peft needs to inject, load and merge a LoRA saved against THUDM's model."""
    root = torch.nn.Module()
    for name, weight in state.items():
        path = name[: -len(".weight")]
        if not name.endswith(".weight") or weight.ndim != 2 or not any(
                path == t or path.endswith("." + t) for t in targets):
            continue
        parent = root
        for part in path.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        bias = state.get(path + ".bias")
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        linear.weight.data = weight.float().clone()
        if bias is not None:
            linear.bias.data = bias.float().clone()
        parent.add_module(path.rsplit(".", 1)[-1], linear)
    return root


@pytest.mark.parametrize("family", ["chatglm", "chatglm3"])
def test_our_lora_output_loads_in_peft_and_merges_like_finetune_merge(family, tmp_path):
    """Our saved LoRA goes through peft's own loader onto THUDM-named layers; its
    merge_and_unload() weights equal `tools/finetune.py --merge --to-hf` (ChatGLM-6B: B's rows
    back in THUDM's per-head qkv order on both sides)."""
    import mindglm
    from mindglm.adapters.lora import LoRAConfig
    from mindglm.adapters.save import save_lora
    from mindglm.yaml_config import load_run_config
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import finetune
    base_yaml = os.path.join(REPO, "configs", "tiny", f"{family}_e2e.yaml")
    targets = ["query_key_value", "dense_4h_to_h"]
    model = mindglm.load_model(base_yaml)
    add_lora(model.network, model.config, targets, 2, 4, seed=1)
    rng = np.random.default_rng(2)
    for _, cell in model.network.cells_and_names():
        if isinstance(cell, LoRALinear):
            cell.lora_b.set_data(Tensor(rng.normal(0, 0.1, cell.lora_b.shape).astype(np.float32)))
    adapter, merged_dir = str(tmp_path / "adapter"), str(tmp_path / "merged")
    save_lora(model.network, model.config, adapter, LoRAConfig(2, 4, targets))
    config = tmp_path / "merge.yaml"
    config.write_text(json.dumps({"model": base_yaml, "method": "lora", "data": {"train_file": "unused.json"}}))
    assert finetune.main(["--config", str(config), "--merge", merged_dir, "--adapter", adapter, "--to-hf"]) == 0

    peft_config = peft.PeftConfig.from_pretrained(adapter)
    peft_config.task_type = None    # a bare module tree, not a causal LM: peft's plain PeftModel
    state = _thudm_state(load_run_config(base_yaml).checkpoint)
    merged = peft.PeftModel.from_pretrained(_linears(state, targets), adapter, config=peft_config)
    merged = merged.merge_and_unload().state_dict()
    ours = torch.load(os.path.join(merged_dir, "pytorch_model.bin"), weights_only=True)
    assert sum(name.endswith(".weight") for name in merged) == len(targets) * model.config.num_layers
    for name, value in merged.items():
        if name.endswith(".weight"):  # peft did load and merge our LoRA there
            assert np.abs(value.numpy() - state[name].float().numpy()).max() > 1e-3, name
        np.testing.assert_allclose(ours[name].numpy(), value.numpy(), atol=1e-6, rtol=0, err_msg=name)
