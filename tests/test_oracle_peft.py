"""Optional oracle: one LoRA training step's loss and gradients equal peft's on transformers'
GlmForCausalLM with the same weights (ChatGLM2/3 network). GlmForCausalLM splits qkv into
q/k/v projections (a LoRA on the fused matrix has no split equivalent), so the adapted layers
are the attention output, the fused gate/up and the down projection."""
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
