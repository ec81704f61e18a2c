"""The CPU kernels (mindglm/kernels, ops.Custom aot) against numpy, the portable path against the
kernels, the Ascend call's argument layout, and the rewrite/loader that puts them in a network."""
import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
from mindspore import Tensor, nn, ops  # noqa: E402

from mindglm.config import GLMConfig  # noqa: E402
from mindglm.loading import WeightLoader, load_weights, weight_slots  # noqa: E402
from mindglm.models import family_module  # noqa: E402
from mindglm.models.layers import Linear  # noqa: E402
from mindglm.quantize import WeightLinear, quantize_network  # noqa: E402
from mindglm.rewrite import replace_cell  # noqa: E402
from mindglm.weight_formats import dequantize, pack_int4_along_n, quantize_rows, unpack_int4  # noqa: E402

RNG = np.random.default_rng(14)


def reference(x, fmt, weight, scale, bias):
    """numpy float64 y = x @ W^T (+ b) for the layer's stored weights."""
    if fmt in ("int8", "int4"):
        w = dequantize(weight, scale, int(fmt[-1])).astype(np.float64)
    else:
        w = weight.astype(np.float64)
    y = x.astype(np.float64) @ w.T
    return y if bias is None else y + bias


def layer(in_features, out_features, fmt, backend, bias=True):
    """A WeightLinear filled from a random float matrix (quantized THUDM's way for int formats)."""
    cell = WeightLinear(in_features, out_features, bias, fmt, backend)
    w = RNG.standard_normal((out_features, in_features)).astype(np.float32)
    b = RNG.standard_normal(out_features).astype(np.float32) if bias else None
    filled = cell.load_parameter("weight", w.astype(np.float16) if fmt == "float16" else w, "w")
    if bias:
        cell.load_parameter("bias", b, "b")
    assert filled == (["weight", "weight_scale"] if fmt.startswith("int") else ["weight"])
    if fmt.startswith("int"):
        q, scale = quantize_rows(w, int(fmt[-1]))
        return cell, (q, scale.astype(np.float32)), b
    return cell, (w.astype(np.float16) if fmt == "float16" else w, None), b


# rows and inputs that are not multiples of the kernels' blocks (8 / 32 columns, 4 rows, 8 outputs)
SHAPES = [(1, 50, 37), (3, 66, 13), (5, 130, 41), (4, 2, 3)]


@pytest.mark.parametrize("fmt", ["int8", "int4", "float16", "float32"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_kernels_match_numpy_on_odd_shapes(fmt, shape, bias):
    m, k, n = shape
    cell, (weight, scale), b = layer(k, n, fmt, "kernels", bias)
    x = RNG.standard_normal((m, k)).astype(np.float32)
    got = cell(Tensor(x)).asnumpy()
    want = reference(x, fmt, weight, scale, b)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())
    portable = WeightLinear(k, n, bias, fmt, "portable")
    for local in ("weight", "weight_scale", "bias"):
        if getattr(cell, local) is not None:
            getattr(portable, local).set_data(getattr(cell, local).value())
    np.testing.assert_allclose(portable(Tensor(x)).asnumpy(), got, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("fmt", ["int8", "int4", "float32"])
def test_threaded_kernels_and_compiled_graph(fmt):
    """Big enough to be split over the threads; inside ms.jit with a leading batch axis."""
    cell, (weight, scale), b = layer(1024, 777, fmt, "kernels")

    class Step(nn.Cell):
        def __init__(self):
            super().__init__()
            self.linear = cell

        @ms.jit
        def construct(self, x):
            return self.linear(x) * 2.0

    x = RNG.standard_normal((2, 3, 1024)).astype(np.float32)
    got = Step()(Tensor(x)).asnumpy()
    want = 2 * reference(x.reshape(6, 1024), fmt, weight, scale, b).reshape(2, 3, 777)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())


def test_ascend_argument_layout():
    """WeightQuantBatchMatmul gets x [M,K], int4 weight [K, N/2] (packed along N, low nibble first)
    or int8 [N, K] with transpose_weight, the scale per output channel in the compute dtype."""
    for fmt in ("int8", "int4"):
        cell = WeightLinear(6, 4, True, fmt, "ascend", ms.float16)
        w = RNG.standard_normal((4, 6)).astype(np.float32)
        cell.load_parameter("weight", w, "w")
        cell.load_parameter("bias", np.arange(4, dtype=np.float32), "b")
        q, scale = quantize_rows(w, int(fmt[-1]))
        kernel, args, kwargs = cell.matmul.kernel_call(Tensor(np.ones((2, 6), np.float32)), cell.weight,
                                                       cell.weight_scale, cell.bias)
        assert kernel is ops.auto_generate.weight_quant_batch_matmul
        x, weight, antiquant_scale = args
        assert x.dtype == ms.float16 and antiquant_scale.dtype == ms.float16 and antiquant_scale.shape == (4,)
        assert kwargs["bias"].shape == (4,) and kwargs["antiquant_offset"] is None
        values = unpack_int4(q) if fmt == "int4" else q
        if fmt == "int4":
            assert weight.shape == (6, 2) and not kwargs["transpose_weight"]
            np.testing.assert_array_equal(weight.asnumpy(), pack_int4_along_n(values))
            packed = weight.asnumpy()  # unpack Ascend's layout by hand: low nibble is element 2j
            low = (packed.astype(np.uint8) << 4).view(np.int8) >> 4
            kn = np.stack([low, packed >> 4], -1).reshape(6, 4)
            np.testing.assert_array_equal(kn.T, values)
        else:
            assert weight.shape == (4, 6) and kwargs["transpose_weight"]
            np.testing.assert_array_equal(weight.asnumpy(), values)


# ------------------------------------------------------------------ rewrite + loader
def tiny_config(**changes):
    values = dict(family="chatglm2", vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4,
                  kv_channels=8, multi_query_group_num=2, ffn_hidden_size=48, seq_length=64)
    values.update(changes)
    return GLMConfig(**values)


def test_replace_cell_keeps_parameter_names():
    network = family_module(tiny_config()).build_network(tiny_config())
    before = [p.name for p in network.get_parameters()]
    network.layers[0].attention.qkv = Linear(32, 64, True, ms.float32, ms.float32)
    # MindSpore 2.10: a cell assigned after build is named from its attribute alone
    assert "qkv.weight" in [p.name for p in network.get_parameters()]
    replace_cell(network, "layers.0.attention.qkv", Linear(32, 64, True, ms.float32, ms.float32))
    replace_cell(network, "layers.1", network.layers[1])  # inside a CellList
    assert [p.name for p in network.get_parameters()] == before
    assert [name for name, _ in network.parameters_and_names()] == before


def test_quantize_rewrite_and_schema():
    config = tiny_config(quantization_bit=4, quantize_output=True)
    network = family_module(config).build_network(config)
    replaced = quantize_network(network, config)
    assert replaced == [f"layers.{i}.{m}" for i in range(2)
                        for m in ("attention.qkv", "attention.dense", "mlp.up", "mlp.down")] + ["output"]
    names = [p.name for p in network.get_parameters()]
    assert "layers.1.mlp.down.weight_scale" in names and "output.weight_scale" in names
    assert names == list(weight_slots(network))
    assert network.layers[1].mlp.down.weight.shape == (32, 24)  # [out, in/2]


def test_loader_partial_sources_dtypes_and_caches():
    config = tiny_config(param_dtype="float16")
    network = family_module(config).build_network(config)
    slots = weight_slots(network)
    arrays = {name: RNG.standard_normal(p.shape).astype(np.float16) for name, (_, _, p) in slots.items()}
    loader = WeightLoader(network)
    first = [n for n in arrays if n.startswith("layers.0.")]
    loader.load(((n, arrays[n]) for n in first), "base")
    assert loader.missing() and not any(n.startswith("layers.0.") for n in loader.missing())
    loader.load(((n, a) for n, a in arrays.items() if n not in first), "rest")
    loader.finish("both")
    param = network.layers[1].mlp.up.weight
    assert param.dtype == ms.float16
    np.testing.assert_array_equal(param.asnumpy(), arrays["layers.1.mlp.up.weight"])
    network.setup_caches(1, 16)  # caches are runtime state: a later partial load ignores them
    assert not any(".cache." in n for n in weight_slots(network))
    load_weights(network, [("final_norm.weight", arrays["final_norm.weight"])], "norm only", partial=True)
    with pytest.raises(ValueError, match="has no place"):
        load_weights(network, [("layers.9.mlp.up.weight", arrays["layers.1.mlp.up.weight"])], "x", partial=True)
    # an owned array in the parameter's dtype becomes its data (no second copy of a big table at
    # load); a view (of a memory map, a reusable buffer) or another dtype is copied
    from mindglm.loading import parameter_data
    owned = RNG.standard_normal((6, 4)).astype(np.float16)
    assert np.shares_memory(parameter_data(owned, ms.float16).asnumpy(), owned)
    buffer = RNG.standard_normal((12, 4)).astype(np.float16)
    for array, dtype in ((buffer[:6], ms.float16), (owned, ms.float32)):
        data = parameter_data(array, dtype)
        assert not np.shares_memory(data.asnumpy(), buffer) and not np.shares_memory(data.asnumpy(), owned)
        np.testing.assert_array_equal(data.asnumpy(), array.astype(np.float32 if dtype == ms.float32 else np.float16))


# ------------------------------------------------------------------ fused element-wise kernels
@pytest.mark.parametrize("lead", [(1, 1), (2, 7), (1, 33)])
def test_fused_norm_and_activation_match_numpy(lead):
    """KernelRMSNorm / KernelSwiGLU against float64 numpy on random widths and row counts, in a
    compiled graph, with an fp16-stored norm weight as the 6B benchmark loads it."""
    from mindglm.fused import KernelRMSNorm, KernelSwiGLU
    from mindglm.models.glm2 import SwiGLU
    from mindglm.models.layers import RMSNorm
    hidden, ffn = int(RNG.integers(3, 70)), int(RNG.integers(2, 50))
    x = RNG.standard_normal(lead + (hidden,)).astype(np.float32)
    w = RNG.standard_normal(hidden).astype(np.float16)
    norm = RMSNorm(hidden, 1e-5, ms.float16)
    norm.weight.set_data(Tensor(w))
    x64 = x.astype(np.float64)
    expected = x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + 1e-5) * w.astype(np.float64)
    config = tiny_config(hidden_size=hidden, ffn_hidden_size=ffn, add_bias_linear=False)
    mlp = SwiGLU(config)
    up = RNG.standard_normal((2 * ffn, hidden)).astype(np.float32)
    down = RNG.standard_normal((hidden, ffn)).astype(np.float32)
    mlp.up.weight.set_data(Tensor(up))
    mlp.down.weight.set_data(Tensor(down))
    fused = x64 @ up.T.astype(np.float64)
    gate, lin = fused[..., :ffn], fused[..., ffn:]
    expected_mlp = (gate / (1 + np.exp(-gate)) * lin) @ down.T.astype(np.float64)

    class Both(nn.Cell):
        def __init__(self):
            super().__init__()
            self.norm, self.mlp = KernelRMSNorm(norm), KernelSwiGLU(mlp)

        def construct(self, x):
            return self.norm(x), self.mlp(x)

    for run in (Both(), ms.jit(Both().construct)):
        got_norm, got_mlp = run(Tensor(x))
        np.testing.assert_allclose(got_norm.asnumpy(), expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_mlp.asnumpy(), expected_mlp, rtol=1e-4, atol=1e-4)


class RecordingRunner:
    """A runner that keeps every step's logits ({request: logits}) as the engine gets them."""

    def __init__(self, runner, recorded: list):
        self.runner, self.recorded = runner, recorded

    def execute(self, plan):
        logits = self.runner.execute(plan)
        self.recorded.append({request: row.copy() for request, row in logits.items()})
        return logits

    def __getattr__(self, name):
        return getattr(self.runner, name)


def test_kernel_models_fuse_norms_and_activations_keeping_names():
    """The quantize rewrite fuses a float32 kernel model's norms and activations: parameter names
    and loading schema unchanged, logits those of the portable backend (dequantize + MatMul,
    MindSpore's own norm and activation ops) on the same weights; float16 compute is left alone."""
    from mindglm.checkpoint import expected_shapes
    from mindglm.engine.model_runner import CompiledStep
    from mindglm.fused import (KernelBlock, KernelRMSNorm, KernelSelfAttention, KernelStackStep, KernelSwiGLU,
                               fuse_blocks, stackable)
    from mindglm.models.glm2 import SwiGLU
    from mindglm.models.layers import RMSNorm, SelfAttention
    from mindglm.pipeline import GLMModel
    weights = {name: (RNG.standard_normal(shape) * 0.3).astype(np.float32)
               for name, shape in expected_shapes(tiny_config()).items()}
    models = {}
    for backend in ("auto", "portable"):
        config = tiny_config(quantization_bit=8, linear_backend=backend)
        network = family_module(config).build_network(config)
        quantize_network(network, config)
        load_weights(network, weights.items(), "random")
        models[backend] = GLMModel(config, network)
    fused, portable = models["auto"].network, models["portable"].network
    assert isinstance(fused.layers[1].post_attention_norm, KernelRMSNorm) and isinstance(fused.final_norm, KernelRMSNorm)
    assert isinstance(fused.layers[0].mlp, KernelSwiGLU) and isinstance(portable.layers[0].mlp.up, WeightLinear)
    assert isinstance(portable.layers[0].input_norm, RMSNorm)
    # still an RMSNorm / SwiGLU to the other rewrites (the tensor-parallel split of [gate | up])
    assert isinstance(fused.layers[0].mlp, SwiGLU) and isinstance(fused.final_norm, RMSNorm)
    names = [p.name for p in fused.get_parameters()]
    assert names == [p.name for p in portable.get_parameters()] == list(weight_slots(fused))
    assert "layers.1.post_attention_norm.weight" in names and "layers.0.mlp.up.weight_scale" in names
    ids = RNG.integers(0, 64, (2, 9))
    np.testing.assert_allclose(models["auto"].logits(ids), models["portable"].logits(ids), atol=1e-4, rtol=0)
    # through the KV cache: prefill and decode steps in two layer kernels around the cache write
    # (KernelBlock; the full forward above ran its cells one by one), two rows of different
    # lengths, every step's logits
    assert isinstance(fused.layers[0].attention, KernelSelfAttention)
    prompts, mask = RNG.integers(1, 64, (2, 9)), np.ones((2, 9), np.int64)
    mask[1, :5] = 0   # a left-padded row of 4 tokens: each row is its own request, decoded together
    steps = {}
    for backend, model in models.items():
        steps[backend] = recorded = []
        model.wrap_runners(lambda runner, use_past, recorded=recorded: RecordingRunner(runner, recorded))
        steps[backend].append(model.generate(prompts, attention_mask=mask, max_new_tokens=6, eos_token_id=-1))
    assert len(steps["auto"]) == len(steps["portable"]) > 5
    for ours, theirs in zip(steps["auto"][:-1], steps["portable"][:-1]):
        assert len(ours) == len(theirs) == 2
        for a, b in zip(ours.values(), theirs.values()):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(steps["auto"][-1], steps["portable"][-1])
    assert all(type(block) is KernelBlock for block in fused.layers)   # since its cached step was built
    assert not any(isinstance(block, KernelBlock) for block in portable.layers)
    # ... and the cached step is every layer in one call (RecordingRunner keeps the ModelRunner)
    assert type(models["auto"].engine.runner.runner.step) is KernelStackStep
    assert type(models["portable"].engine.runner.runner.step) is CompiledStep
    # a P-Tuning prefix wraps the fused attention like the plain one: its P slots lead every cache row
    from mindglm.adapters.prefix import apply_prefix
    config = tiny_config()
    prefix = [tuple(RNG.standard_normal((3, config.kv_heads, config.head_dim)).astype(np.float32) for _ in "kv")
              for _ in range(config.num_layers)]
    replies, recorded = {}, {}
    for backend in ("auto", "portable"):
        config = tiny_config(quantization_bit=8, linear_backend=backend)
        network = family_module(config).build_network(config)
        quantize_network(network, config)
        load_weights(network, weights.items(), "random")
        apply_prefix(network, prefix)
        model = GLMModel(config, network)
        recorded[backend] = []
        model.wrap_runners(lambda runner, use_past, rows=recorded[backend]: RecordingRunner(runner, rows))
        replies[backend] = (model.generate(prompts, attention_mask=mask, max_new_tokens=6, eos_token_id=-1),
                            model.logits(prompts[:1]))
        assert isinstance(network.layers[0].attention.attention,
                          KernelSelfAttention if backend == "auto" else SelfAttention)
        assert isinstance(network.layers[0], KernelBlock) == (backend == "auto")
        assert stackable(network) == (backend == "auto")
    np.testing.assert_array_equal(replies["auto"][0], replies["portable"][0])
    np.testing.assert_allclose(replies["auto"][1], replies["portable"][1], atol=1e-4, rtol=0)
    for ours, theirs in zip(recorded["auto"], recorded["portable"], strict=True):
        for a, b in zip(ours.values(), theirs.values(), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    half = tiny_config(quantization_bit=8, compute_dtype="float16")
    network = family_module(half).build_network(half)
    quantize_network(network, half)
    assert isinstance(network.layers[0].input_norm, RMSNorm) and not isinstance(network.layers[0].mlp, KernelSwiGLU)
    # GLM v1 (LayerNorm, GELU, residuals from the norm) keeps its Blocks; so does a block with a LoRA cell
    from mindglm.adapters.lora import LoRALinear
    import dataclasses
    import os
    v1 = dataclasses.replace(GLMConfig.from_thudm(os.path.join(os.path.dirname(__file__), "fixtures", "models",
                                                                "chatglm-tiny")), quantization_bit=8)
    network = family_module(v1).build_network(v1)
    quantize_network(network, v1)
    assert fuse_blocks(network) == []
    config = tiny_config(quantization_bit=8)
    network = family_module(config).build_network(config)
    quantize_network(network, config)
    network.layers[1].attention.dense = LoRALinear(network.layers[1].attention.dense, 2, 1.0)
    assert fuse_blocks(network) == ["layers.0"]
    assert not stackable(network)   # one block left unfused: the blocks step one by one


def test_float16_checkpoint_steps_in_one_kernel_call():
    """A model kept in its checkpoint's float16 (param_dtype and weight_dtype float16, float32
    compute: tools/bench_6b.py's fp16 and int4 runs) steps through MindglmNetworkStep too, its
    float16 embedding and norms read as they are stored: every step's logits within 1e-4 of the
    portable backend's on the same weights (dequantize + MatMul, one MindSpore op at a time) and
    the same greedy tokens, for a row decoded alone and two rows decoded together."""
    from mindglm.checkpoint import expected_shapes
    from mindglm.fused import KernelStackStep
    from mindglm.pipeline import GLMModel
    weights = {name: (RNG.standard_normal(shape) * 0.3).astype(np.float16)
               for name, shape in expected_shapes(tiny_config()).items()}
    prompts, mask = RNG.integers(1, 64, (2, 7)), np.ones((2, 7), np.int64)
    mask[0, :3] = 0
    steps, tokens = {}, {}
    for backend in ("auto", "portable"):
        for bits in (0, 4):
            config = tiny_config(param_dtype="float16", weight_dtype="float16", quantization_bit=bits,
                                 linear_backend=backend)
            network = family_module(config).build_network(config)
            quantize_network(network, config)
            load_weights(network, weights.items(), "random")
            assert network.embedding.weight.dtype == network.final_norm.weight.dtype == ms.float16
            model = GLMModel(config, network)
            steps[backend, bits] = recorded = []
            model.wrap_runners(lambda runner, use_past, recorded=recorded: RecordingRunner(runner, recorded))
            tokens[backend, bits] = [model.generate(prompts[:1], max_new_tokens=5, eos_token_id=-1),
                                     model.generate(prompts, attention_mask=mask, max_new_tokens=5, eos_token_id=-1)]
            assert (type(model.engine.runner.runner.step) is KernelStackStep) == (backend == "auto")
    for bits in (0, 4):
        ours, theirs = steps["auto", bits], steps["portable", bits]
        assert len(ours) == len(theirs) > 8
        for a, b in zip(ours, theirs):
            for x, y in zip(a.values(), b.values(), strict=True):   # request ids differ between the models
                np.testing.assert_allclose(x, y, atol=1e-4, rtol=0)
        for a, b in zip(tokens["auto", bits], tokens["portable", bits]):
            np.testing.assert_array_equal(a, b)


def test_decode_steps_give_the_tokens_of_one_step_a_call():
    """engine.decode_steps 4 on a one-call (KernelStackStep) network: greedy rows decode up to 4
    tokens a call, and every request gets the tokens and stream it gets one step a call — rows
    decoded together, budgets that are not a multiple of 4, a stop id met inside a call's steps,
    a repetition penalty and a sampled request (those run one step a call while they decode). No
    graph compiles after warm-up."""
    from mindglm.checkpoint import expected_shapes
    from mindglm.engine import Engine, EngineConfig
    from mindglm.engine.model_runner import DecodeSteps
    from mindglm.generation.config import GenerationConfig
    weights = {name: (RNG.standard_normal(shape) * 1.0).astype(np.float32)
               for name, shape in expected_shapes(tiny_config()).items()}
    prompts = [list(RNG.integers(1, 64, n)) for n in (9, 4, 6)]

    def engine(steps):
        config = tiny_config(quantization_bit=8)
        network = family_module(config).build_network(config)
        quantize_network(network, config)
        load_weights(network, weights.items(), "random")
        built = Engine(network, config, EngineConfig(max_num_seqs=4, max_model_len=48, decode_steps=steps))
        built.warmup()
        return built

    def run(engine, requests):
        """(output ids, streamed ids) of each request, run together, and the calls' step counts."""
        streams = [[] for _ in requests]
        seqs = [engine.add_request(prompt, generation, stop_ids=stop,
                                   listener=lambda seq, new, i=i: streams[i].extend(new))
                for i, (prompt, generation, stop) in enumerate(requests)]
        calls = []
        execute = engine.runner.execute
        engine.runner.execute = lambda plan: calls.append(plan.decode_steps if plan.decode else 0) or execute(plan)
        engine.run_until_done(seqs)
        engine.runner.execute = execute
        return [(seq.output_ids, seq.finish_reason) for seq in seqs], streams, calls

    from mindglm.kernels.build import head_counters
    one, four = engine(1), engine(4)
    assert four.runner.decode_steps == 4 and one.runner.decode_steps == 1
    # THUDM's int8 keeps the output layer float32: the several-step calls go through its bfloat16 copy
    assert one.runner.rounded_head is None and four.runner.rounded_head.shape == (64, tiny_config().hidden_size)
    greedy = [(prompts[0], GenerationConfig(max_new_tokens=11), ()), (prompts[1], GenerationConfig(max_new_tokens=6), ())]
    want, want_streams, calls = run(one, greedy)
    head_counters(reset=True)
    got, streams, multi_calls = run(four, greedy)
    exact, given = head_counters(reset=True)
    assert 0 < exact < given        # the copy decided some logits, float32 rows the rest
    assert got == want and streams == want_streams == [ids for ids, _ in want]
    assert len(set(want[0][0])) > 3                    # the weights give varied tokens
    assert set(calls) == {0, 1} and 4 in multi_calls and len(multi_calls) < len(calls)   # 0: prefill alone
    # a stop id met inside a call's steps: the row ends there, as one step a call ends it
    stop = want[0][0][5]
    stopping = [(prompts[0], GenerationConfig(max_new_tokens=11), (stop,)), greedy[1]]
    want, want_streams, _ = run(one, stopping)
    got, streams, _ = run(four, stopping)
    assert got == want and streams == want_streams and want[0][1] == "stop" and len(want[0][0]) <= 6
    # a penalty or a sampled request beside a greedy one: one step a call while it decodes
    mixed = [greedy[0], (prompts[2], GenerationConfig(max_new_tokens=5, repetition_penalty=1.3), ()),
             (prompts[1], GenerationConfig(max_new_tokens=7, do_sample=True, temperature=0.9, seed=3), ())]
    want, want_streams, _ = run(one, mixed)
    got, streams, multi_calls = run(four, mixed)
    assert got == want and streams == want_streams and multi_calls.count(4) > 0
    assert four.compiles == len(four.runner.reachable_shapes())   # all at warm-up
    # the runner's several-step rows: each later step fed the previous step's argmax
    plan = four.scheduler.schedule()
    assert plan.empty
    seq = four.add_request(prompts[2], GenerationConfig(max_new_tokens=9))
    four.step()                                          # prefill + first token
    plan = four.scheduler.schedule()
    assert plan.decode_steps == 4
    (row,) = four.runner.execute(plan).values()
    assert isinstance(row, DecodeSteps) and row.logits.shape == (4, 64)
    assert row.fed[0] == seq.output_ids[-1] and list(row.fed[1:]) == list(row.logits[:-1].argmax(-1))
    # a step whose fed token is not the one sampled before it is dropped, and every later one
    from mindglm.engine.engine import take_tokens
    logits = np.zeros((3, 64), np.float32)
    logits[0, 5] = logits[1, 7] = logits[2, 9] = 1.0
    before = list(seq.output_ids)
    assert take_tokens(seq, DecodeSteps(logits, np.array([seq.output_ids[-1], 5, 8]))) == 2
    assert seq.output_ids == before + [5, 7]


# ------------------------------------------------------------------ fused attention kernels
def _compiled(op):
    """`op` inside a graph-compiled Cell."""
    class Graph(nn.Cell):
        def __init__(self):
            super().__init__()
            self.op = op

        @ms.jit
        def construct(self, *args):
            return self.op(*args)
    return Graph()

def _rotary_reference(x, cos, sin, rotate_matrix):
    """numpy float64 x * cos + (x @ R) * sin on the first R dims of every head, the rest as is."""
    dims = rotate_matrix.shape[0]
    x64, out = x.astype(np.float64), x.astype(np.float64).copy()
    turned = x64[..., :dims] @ rotate_matrix.astype(np.float64)
    out[..., :dims] = x64[..., :dims] * cos[:, None] + turned * sin[:, None]
    return out


@pytest.mark.parametrize("pairing", ["interleaved", "half"])
def test_fused_qkv_rotary_matches_numpy(pairing):
    """The qkv split + rotary kernel on random head counts, head sizes and rotary widths (all of a
    head or its first part), for both pairings GLM families use, eagerly and compiled."""
    from mindglm.fused import signed_permutation
    from mindglm.models.layers import rotate_half_matrix, rotate_interleaved_matrix
    tokens, heads, kv_heads = int(RNG.integers(1, 9)), int(RNG.integers(1, 5)), int(RNG.integers(1, 3))
    dim = 2 * int(RNG.integers(2, 20))
    dims = dim if RNG.random() < 0.5 else 2 * int(RNG.integers(1, dim // 2 + 1))
    matrix = (rotate_interleaved_matrix if pairing == "interleaved" else rotate_half_matrix)(dims)
    partner, sign = signed_permutation(matrix)
    qkv = RNG.standard_normal((tokens, (heads + 2 * kv_heads) * dim)).astype(np.float32)
    angles = RNG.uniform(-3, 3, (tokens, dims)).astype(np.float32)
    cos, sin = np.cos(angles), np.sin(angles)
    from mindglm.fused import _kernel
    def shapes(t, *rest):
        return [t[0], heads, dim], [t[0], kv_heads, dim], [t[0], kv_heads, dim]
    op = _kernel("MindglmQkvRotary", shapes, outputs=3)
    heads_of = qkv.reshape(tokens, heads + 2 * kv_heads, dim)
    want_q = _rotary_reference(heads_of[:, :heads], cos, sin, matrix)
    want_k = _rotary_reference(heads_of[:, heads:heads + kv_heads], cos, sin, matrix)
    args = [Tensor(a) for a in (qkv, cos, sin, partner, sign)]
    for run in (op, _compiled(op)):
        q, k, v = (t.asnumpy() for t in run(*args))
        np.testing.assert_allclose(q, want_q, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(k, want_k, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(v, heads_of[:, heads + kv_heads:])
    assert signed_permutation(np.eye(dims, dtype=np.float32) * 2) is None
    assert signed_permutation(np.ones((dims, dims), np.float32)) is None


def _attention_reference(q, cache_k, cache_v, kv_slots, allowed, query_scale, score_scale):
    """float64 numpy decode attention as DotProductAttention computes it: q [b, heads, d] over the
    cache slots kv_slots [b, keys] (cache [slots, kv_heads, d]), keys not allowed filled with -1e9."""
    batch, heads, dim = q.shape
    group = heads // cache_k.shape[1]
    k64, v64 = cache_k[kv_slots].astype(np.float64), cache_v[kv_slots].astype(np.float64)  # [b, keys, kv, d]
    want = np.zeros((batch, heads, dim))
    for b in range(batch):
        for h in range(heads):
            s = k64[b, :, h // group] @ (q[b, h].astype(np.float64) * query_scale) * score_scale
            s = np.where(allowed[b], s, -1e9)
            p = np.exp(s - s.max())
            want[b, h] = (p / p.sum()) @ v64[b, :, h // group]
    return want


@pytest.mark.parametrize("batch,keys", [(1, 5), (3, 40), (4, 700)])
def test_fused_cache_attention_matches_numpy(batch, keys):
    """Decode attention over cache slots against float64 numpy: grouped kv heads, random slots and
    masks (a row with nothing allowed averages every key, as softmax of equal scores does), a
    score scale as GLM v1 has; the largest case runs threaded."""
    from mindglm.fused import _kernel
    kv_heads = int(RNG.integers(1, 3))
    heads, dim, slots = kv_heads * int(RNG.integers(1, 4)), int(RNG.integers(3, 40)), keys + 17
    q = RNG.standard_normal((batch, heads, dim)).astype(np.float32)
    cache_k = RNG.standard_normal((slots, kv_heads, dim)).astype(np.float32)
    cache_v = RNG.standard_normal((slots, kv_heads, dim)).astype(np.float32)
    kv_slots = RNG.integers(0, slots, (batch, keys)).astype(np.int32)
    allowed = RNG.random((batch, keys)) < 0.7
    allowed[0, 0] = True
    if batch > 1:
        allowed[-1] = False
    query_scale, score_scale = 1 / np.sqrt(dim), float(RNG.uniform(0.5, 3))
    want = _attention_reference(q, cache_k, cache_v, kv_slots, allowed, query_scale, score_scale)
    op = _kernel("MindglmCacheAttention", lambda q, *cache: q)
    args = [Tensor(a) for a in (q, cache_k, cache_v, kv_slots, allowed, np.float32([query_scale, score_scale]))]
    for run in (op, _compiled(op)):
        np.testing.assert_allclose(run(*args).asnumpy(), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ every SIMD level
def _call(library: str, name: str, inputs: list, out_shapes: list, status: int = 0) -> list:
    """Call an AOT entry point of `library` directly (MindSpore's signature) on numpy arrays;
    `status`: the return code it must give."""
    import ctypes
    arrays = [np.ascontiguousarray(a) for a in inputs] + [np.zeros(s, np.float32) for s in out_shapes]
    shapes = [np.array(a.shape, np.int64) for a in arrays]
    n = len(arrays)
    params = (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrays])
    ndims = (ctypes.c_int * n)(*[a.ndim for a in arrays])
    dims = (ctypes.POINTER(ctypes.c_int64) * n)(*[s.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)) for s in shapes])
    returned = getattr(ctypes.CDLL(library), name)(n, params, ndims, dims, None, None, None)
    assert returned == status, f"{name} returned {returned}"
    return arrays[len(inputs):]


# ------------------------------------------------------------------ fused layer kernels
def _random_layer(out_features, in_features, fmt):
    """(stored weight, scale, bias) of a random layer in `fmt` as the block kernels take them (a
    unit scale for float formats; int bytes of every value, -8 / -128 included)."""
    if fmt.startswith("int"):
        w = RNG.integers(-128, 128, (out_features, in_features // (2 if fmt == "int4" else 1)), dtype=np.int8)
        scale = RNG.uniform(0.01, 0.1, out_features).astype(np.float32)
    else:
        w = (RNG.standard_normal((out_features, in_features)) * 0.2).astype(np.float16 if fmt == "float16" else np.float32)
        scale = np.ones(out_features, np.float32)
    return w, scale, RNG.standard_normal(out_features).astype(np.float32)


def _linear_reference(x, fmt, layer):
    w, scale, bias = layer
    return reference(x, fmt, w, scale if fmt.startswith("int") else None, bias)


def _assert_close(got, want):
    """float32 against float64 sums of hundreds of terms: within 1e-4 of the result's scale."""
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))


def _rms_reference(x, w, eps):
    x64 = x.astype(np.float64)
    return x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + eps) * w


def test_fused_block_kernels_match_numpy():
    """The layer kernels (block.cc) against float64 numpy composed step by step: norm + qkv +
    rotary; attention over cache slots + dense + residual + norm + SwiGLU MLP + residual, for
    prefill-shaped calls (several queries a row, each with its own keys) and decode-shaped ones;
    random sizes, formats mixed within a layer, more tokens than one chunk; and a format code or
    a weight shape that does not fit is refused (a status, not a crash)."""
    from mindglm.fused import signed_permutation
    from mindglm.kernels.build import library_path
    from mindglm.models.layers import rotate_interleaved_matrix
    from mindglm.quantize import FORMATS
    library = library_path()
    heads, kv_heads, dim = 4, 2, 4 * int(RNG.integers(2, 6))
    hidden, ffn, tokens = 2 * int(RNG.integers(20, 60)), int(RNG.integers(20, 90)), 70
    formats = [FORMATS[i] for i in RNG.integers(0, 4, 4)]
    qkv, dense, up, down = (_random_layer(n, k, fmt) for (n, k), fmt in zip(
        [((heads + 2 * kv_heads) * dim, hidden), (hidden, heads * dim), (2 * ffn, hidden), (hidden, ffn)], formats))
    if formats[3] == "int4" and ffn % 2:
        formats[3] = "int8"
        down = _random_layer(hidden, ffn, "int8")
    h = RNG.standard_normal((tokens, hidden)).astype(np.float32)
    norms = RNG.uniform(0.5, 1.5, (2, hidden)).astype(np.float32)
    eps = np.float32([1e-5])
    rotary = dim // 2
    matrix = rotate_interleaved_matrix(rotary)
    partner, sign = signed_permutation(matrix)
    angles = RNG.uniform(-3, 3, (tokens, rotary)).astype(np.float32)
    cos, sin = np.cos(angles), np.sin(angles)
    code = lambda *fmts: np.int32([FORMATS.index(f) for f in fmts])  # noqa: E731
    q, k, v = _call(library, "MindglmAttentionInput",
                    [h, code(formats[0]), norms[0], eps, *qkv, cos, sin, partner, sign],
                    [(tokens, heads, dim), (tokens, kv_heads, dim), (tokens, kv_heads, dim)])
    fused = _linear_reference(_rms_reference(h, norms[0], 1e-5), formats[0], qkv).reshape(tokens, -1, dim)
    _assert_close(q, _rotary_reference(fused[:, :heads], cos, sin, matrix))
    _assert_close(k, _rotary_reference(fused[:, heads:heads + kv_heads], cos, sin, matrix))
    _assert_close(v, fused[:, heads + kv_heads:])

    def mlp_reference(attn, h):
        h1 = h + _linear_reference(attn, formats[1], dense)
        gate_up = _linear_reference(_rms_reference(h1, norms[1], 1e-5), formats[2], up)
        gate, lin = gate_up[:, :ffn], gate_up[:, ffn:]
        return h1 + _linear_reference(gate / (1 + np.exp(-gate)) * lin, formats[3], down)

    mlp_inputs = [code(*formats[1:]), *dense, norms[1], eps, *up, *down]
    scales = np.float32([1 / np.sqrt(dim), float(RNG.uniform(0.5, 2))])
    cache = RNG.standard_normal((2, 50, kv_heads, dim)).astype(np.float32)
    # prefill-shaped (2 rows of 35 queries: more tokens than a chunk) and decode-shaped (3 rows of one)
    for batch, queries, keys in [(2, tokens // 2, 40), (3, 1, 11)]:
        kv_slots = RNG.integers(0, 50, (batch, keys)).astype(np.int32)
        allowed = RNG.random((batch, queries, keys)) < 0.7
        allowed[..., 0] = True
        rows = batch * queries
        (out,) = _call(library, "MindglmLayerOutput", [q[:rows], *cache, kv_slots, allowed, scales, h[:rows],
                                                       *mlp_inputs], [(rows, hidden)])
        attended = _attention_reference(q[:rows], *cache, np.repeat(kv_slots, queries, 0),
                                        allowed.reshape(rows, keys), *scales).reshape(rows, -1)
        _assert_close(out, mlp_reference(attended, h[:rows]))
    # refused: an unknown format code, a weight whose packing disagrees with its format
    attention = [q[:rows], *cache, kv_slots, allowed, scales, h[:rows]]
    _call(library, "MindglmLayerOutput", attention + [np.int32([7, 0, 0]), *mlp_inputs[1:]], [(rows, hidden)],
          status=2)
    wrong = code("int4" if formats[0] != "int4" else "int8")
    _call(library, "MindglmAttentionInput", [h, wrong, norms[0], eps, *qkv, cos, sin, partner, sign],
          [(tokens, heads, dim), (tokens, kv_heads, dim), (tokens, kv_heads, dim)], status=2)


def _assert_greedy_rows(greedy, full):
    """`greedy` logits rows are the greedy head's for `full` ones: the same first largest, exact
    wherever they differ from being below the row's largest, and within the bfloat16 copy's error."""
    best = full.argmax(-1)
    np.testing.assert_array_equal(greedy.argmax(-1), best)
    np.testing.assert_array_equal(greedy[np.arange(len(full)), best], full[np.arange(len(full)), best])
    top = full.max(-1, keepdims=True)
    approximate = greedy != full
    assert (greedy[approximate] < np.broadcast_to(top, full.shape)[approximate]).all()
    np.testing.assert_allclose(greedy, full, rtol=0, atol=2 ** -7 * float(np.abs(full).max()) + 1e-3)


def test_bfloat16_bits_round_to_nearest_even():
    """bfloat16_bits against the two bfloat16 neighbours of each float32 (its bits cut to 16, and
    one up): the nearer, ties to the even one; overflow to infinity; NaN and infinities stay."""
    from mindglm.weight_formats import bfloat16_bits
    bits = RNG.integers(0, 2 ** 32, 20000, dtype=np.uint64).astype(np.uint32)
    bits[:4] = [0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x00000001]   # ties (down, up to even), overflow, subnormal
    w = bits.view(np.float32)
    finite = np.isfinite(w)
    got = bfloat16_bits(w).astype(np.uint32) << 16
    with np.errstate(invalid="ignore"):
        down = (bits & 0xFFFF0000).view(np.float32).astype(np.float64)
        up = ((bits & 0xFFFF0000).astype(np.uint64) + 0x10000).astype(np.uint32).view(np.float32).astype(np.float64)
        exact = w.astype(np.float64)
    up = np.where(np.isinf(up), np.copysign(2.0 ** 128, down), up)   # past the largest bfloat16: 2^128 as IEEE rounds
    distance_down, distance_up = np.abs(exact - down), np.abs(up - exact)
    even_down = (bits >> 16) % 2 == 0
    want = np.where((distance_down < distance_up) | ((distance_down == distance_up) & even_down),
                    bits & 0xFFFF0000, ((bits & 0xFFFF0000).astype(np.uint64) + 0x10000).astype(np.uint32))
    np.testing.assert_array_equal(got[finite], want[finite])
    assert list(got[:4]) == [0x3F800000, 0x3F820000, 0x7F800000, 0]
    assert not np.isfinite(got.view(np.float32)[~finite]).any()


def test_greedy_head_finds_the_full_layers_largest_logit():
    """LinearArgmaxRows (a float32 output layer through its bfloat16 copy, then float32 rows only
    where the copy cannot decide) against the full float32 kernel on the same inputs: the same
    first largest logit bit for bit, and every logit it left approximate below it — on random
    heads (most logits decided by the copy), a cluster of near-ties and exact ties at the top
    (rows equal in bfloat16, decided in float32: the first largest wins), non-finite weights
    (their logits as the full layer's), 1 and 5 rows of x (the kernel's 4-row block and the rest),
    odd sizes, a scale and bias, a long row (the two-rows-a-pass dot), and a head whose logits are
    all within the copy's error (computed whole)."""
    from mindglm.kernels.build import library_path
    from mindglm.weight_formats import bfloat16_bits
    library = library_path()

    def both(x, w, scale, bias):
        rounded = bfloat16_bits(w).view(np.int16)
        (full,) = _call(library, "MatmulF32", [x, w, bias], [(len(x), len(w))])
        (greedy,) = _call(library, "MatmulF32Greedy", [x, w, rounded, np.ones(len(w), np.float32) if scale is None
                                                       else scale, bias], [(len(x), len(w))])
        if scale is not None:   # MatmulF32 takes no scale: the reference scales its dots the kernel's way
            (dots,) = _call(library, "MatmulF32", [x, w], [(len(x), len(w))])
            full = (dots * scale + bias).astype(np.float32)
        return greedy, full

    for rows, n, k, shape in [(1, 5003, 1000, "random"), (5, 3001, 77, "ties"), (5, 2003, 130, "non-finite"),
                              (3, 999, 64, "scaled"), (1, 301, 8200, "random"), (2, 500, 40, "all near")]:
        x = RNG.standard_normal((rows, k)).astype(np.float32)
        w = (RNG.standard_normal((n, k)) * 0.05).astype(np.float32)
        scale, bias = None, np.zeros(n, np.float32)
        if shape == "ties":       # rows 0..59: one row (the largest) with its low mantissa bits changed
            w[0] = np.sign(x.sum(0)) * 0.5
            w[1:60] = w[0] * (1 + RNG.integers(-40, 41, (59, 1)) * 2.0 ** -22)
            w[[20, 41]] = w[9]    # exact ties with row 9
        if shape == "non-finite":
            w[7, 3], w[11, 0], w[13, 5] = np.inf, np.nan, -np.inf
        if shape == "scaled":
            scale = RNG.uniform(0.5, 2, n).astype(np.float32)
            bias = RNG.standard_normal(n).astype(np.float32)
        if shape == "all near":
            w[:] = w[0] * (1 + RNG.integers(-40, 41, (n, 1)) * 2.0 ** -22)
        greedy, full = both(x, w, scale, bias)
        finite = np.isfinite(full).all(-1)
        np.testing.assert_array_equal(np.isfinite(greedy), np.isfinite(full))
        np.testing.assert_array_equal(greedy[~np.isfinite(full)], full[~np.isfinite(full)])
        if shape == "non-finite":
            assert not finite.any()
            continue
        _assert_greedy_rows(greedy, full)
        decided = float((greedy != full).mean())
        if shape == "all near":
            assert decided == 0.0          # computed whole
        else:
            assert decided > 0.5, (shape, decided)
        if shape == "ties":
            assert (full.argmax(-1) < 60).all()


def test_network_step_matches_numpy():
    """MindglmNetworkStep (the whole cached step in one call: embedding, rotary rows and mask, every
    layer writing its KV cache itself, final norm and output layer) against float64 numpy composed
    step by step: three layers and an output layer of random formats, prefill-shaped calls (2 rows
    of 35 queries, more tokens than a chunk, each row reading the slots it just wrote; a float16
    embedding) and decode-shaped ones (3 rows of one; float32), random masks and logits rows; each layer's new keys and values land at slot_mapping
    and nothing else in its cache changes. A slot, token id or position out of range, or one
    layer's wrong format code, is refused before any cache is written."""
    from mindglm.fused import STACK_CACHE, STACK_PER_LAYER, STACK_SHARED, signed_permutation
    from mindglm.kernels.build import library_path
    from mindglm.models.layers import rotate_interleaved_matrix
    from mindglm.quantize import FORMATS
    library = library_path()
    heads, kv_heads, dim, slots, vocab, positions = 4, 2, 4 * int(RNG.integers(2, 5)), 90, 37, 50
    hidden, ffn = 2 * int(RNG.integers(20, 50)), 2 * int(RNG.integers(10, 40))
    rotary = dim // 2
    matrix = rotate_interleaved_matrix(rotary)
    partner, sign = signed_permutation(matrix)
    eps = np.float32([1e-5])
    angles = RNG.uniform(-3, 3, (positions, rotary)).astype(np.float32)
    cos_table, sin_table = np.cos(angles), np.sin(angles)
    embedding = RNG.standard_normal((vocab, hidden)).astype(np.float32)
    output_format = FORMATS[int(RNG.integers(0, 4))]
    output, final_norm = _random_layer(vocab + 3, hidden, output_format), RNG.uniform(0.5, 1.5, hidden).astype(np.float32)
    layers = []
    for _ in range(3):
        formats = [FORMATS[i] for i in RNG.integers(0, 4, 4)]
        sizes = [((heads + 2 * kv_heads) * dim, hidden), (hidden, heads * dim), (2 * ffn, hidden), (hidden, ffn)]
        layers.append(dict(formats=formats, linears=[_random_layer(n, k, f) for (n, k), f in zip(sizes, formats)],
                           norms=RNG.uniform(0.5, 1.5, (2, hidden)).astype(np.float32),
                           scales=np.float32([1 / np.sqrt(dim), float(RNG.uniform(0.5, 2))]),
                           cache=RNG.standard_normal((2, slots, kv_heads, dim)).astype(np.float32)))

    def arguments(step, caches, codes, output=output, head_format=output_format, rounded=np.zeros((1, 1), np.int16)):
        args = [step[name] for name in ("ids", "positions", "key_valid", "first", "last", "slot_mapping", "kv_slots",
                                        "logits_index")]
        table = step["embedding"]
        args += [np.int32([FORMATS.index(str(table.dtype)), FORMATS.index(head_format)]),
                 table, cos_table, sin_table, partner, sign, final_norm, eps, *output, rounded]
        for layer, cache, code in zip(layers, caches, codes):
            qkv, dense, up, down = layer["linears"]
            args += [layer["norms"][0], eps, *qkv, cache[0], cache[1], layer["scales"], code, *dense,
                     layer["norms"][1], eps, *up, *down]
        return args

    codes = [np.int32([FORMATS.index(f) for f in layer["formats"]]) for layer in layers]
    # prefill-shaped with a float16 embedding, decode-shaped with a float32 one
    for (batch, queries, keys), table in [((2, 35, 40), embedding.astype(np.float16)), ((3, 1, 11), embedding)]:
        tokens = batch * queries
        slot_mapping = RNG.choice(slots, tokens, replace=False).astype(np.int32)
        kv_slots = RNG.integers(0, slots, (batch, keys)).astype(np.int32)
        kv_slots[:, :queries] = slot_mapping.reshape(batch, queries)   # each row reads what it wrote
        first = RNG.integers(0, 3, (batch, queries)).astype(np.int32)
        step = dict(ids=RNG.integers(0, vocab, (batch, queries)).astype(np.int32),
                    positions=RNG.integers(0, positions, (batch, 1, queries)).astype(np.int32),
                    key_valid=(RNG.random((batch, keys)) < 0.8).astype(np.int32), first=first,
                    last=first + RNG.integers(0, keys, (batch, queries)).astype(np.int32), slot_mapping=slot_mapping,
                    kv_slots=kv_slots, logits_index=RNG.choice(tokens, min(tokens, 4), replace=False).astype(np.int32),
                    embedding=table)
        caches = [layer["cache"].copy() for layer in layers]
        args = arguments(step, caches, codes)
        assert len(args) == STACK_SHARED + 3 * STACK_PER_LAYER
        assert all(np.shares_memory(args[STACK_SHARED + i * STACK_PER_LAYER + at], caches[i][j])
                   for i in range(3) for j, at in enumerate(STACK_CACHE))
        n = len(step["logits_index"])
        logits, fed = _call(library, "MindglmNetworkStep", args, [(n, vocab + 3), (1, n)])
        np.testing.assert_array_equal(fed[0], step["ids"].reshape(-1)[step["logits_index"]])
        x = table[step["ids"].reshape(-1)].astype(np.float64)
        cos, sin = cos_table[step["positions"].reshape(-1)], sin_table[step["positions"].reshape(-1)]
        key_index = np.arange(keys)
        allowed = ((key_index >= step["first"][..., None]) & (key_index <= step["last"][..., None]) &
                   (step["key_valid"][:, None, :] != 0)).reshape(tokens, keys)
        for layer, cache in zip(layers, caches):
            qkv, dense, up, down = layer["linears"]
            fmt_qkv, fmt_dense, fmt_up, fmt_down = layer["formats"]
            fused = _linear_reference(_rms_reference(x, layer["norms"][0], 1e-5), fmt_qkv, qkv).reshape(tokens, -1, dim)
            q = _rotary_reference(fused[:, :heads], cos, sin, matrix)
            k = _rotary_reference(fused[:, heads:heads + kv_heads], cos, sin, matrix)
            v = fused[:, heads + kv_heads:]
            want_cache = layer["cache"].astype(np.float64)
            want_cache[0][slot_mapping], want_cache[1][slot_mapping] = k, v
            untouched = np.setdiff1d(np.arange(slots), slot_mapping)
            np.testing.assert_array_equal(cache[:, untouched], layer["cache"][:, untouched])
            _assert_close(cache[:, slot_mapping], want_cache[:, slot_mapping])
            attended = _attention_reference(q, *want_cache, np.repeat(kv_slots, queries, 0), allowed,
                                            *layer["scales"]).reshape(tokens, -1)
            h1 = x + _linear_reference(attended, fmt_dense, dense)
            gate_up = _linear_reference(_rms_reference(h1, layer["norms"][1], 1e-5), fmt_up, up)
            x = h1 + _linear_reference(gate_up[:, :ffn] / (1 + np.exp(-gate_up[:, :ffn])) * gate_up[:, ffn:],
                                       fmt_down, down)
        head = _rms_reference(x[step["logits_index"]], final_norm, 1e-5)
        _assert_close(logits, _linear_reference(head, output_format, output))
    # three greedy decode steps in one call (logits_index [3, batch]) are three calls one step
    # each, fed the argmax, one position, slot and key on: bit for bit, caches included
    head = _random_layer(vocab, hidden, output_format)     # its argmax must be a token id
    base = np.arange(3, dtype=np.int32)[:, None] * 30
    decode = dict(ids=RNG.integers(0, vocab, (3, 1)).astype(np.int32), positions=np.int32([[[4]], [[9]], [[0]]]),
                key_valid=(np.arange(11) <= np.int32([[5], [2], [8]])).astype(np.int32),   # row 2: the window's end
                first=np.zeros((3, 1), np.int32), last=np.int32([[5], [2], [8]]), embedding=embedding,
                kv_slots=base + np.arange(11, dtype=np.int32), logits_index=np.tile(np.arange(3, dtype=np.int32), (3, 1)))
    decode["slot_mapping"] = (base[:, 0] + decode["last"][:, 0]).astype(np.int32)
    together = [layer["cache"].copy() for layer in layers]
    logits, fed = _call(library, "MindglmNetworkStep", arguments(decode, together, codes, head), [(9, vocab), (3, 3)])
    apart, single = [layer["cache"].copy() for layer in layers], dict(decode, logits_index=np.arange(3, dtype=np.int32))
    for k in range(3):
        want, want_fed = _call(library, "MindglmNetworkStep", arguments(single, apart, codes, head), [(3, vocab), (1, 3)])
        np.testing.assert_array_equal(logits[3 * k:3 * k + 3], want)
        np.testing.assert_array_equal(fed[k], want_fed[0])
        last = single["last"] + 1
        single = dict(single, ids=want.argmax(-1).astype(np.int32)[:, None], positions=single["positions"] + 1,
                      last=last, slot_mapping=single["slot_mapping"] + 1,
                      key_valid=(np.arange(11) <= last).astype(np.int32))
    for a, b in zip(together, apart):
        np.testing.assert_array_equal(a, b)
    # a float32 head with its bfloat16 copy: the same tokens fed, each row's largest logit exact
    from mindglm.weight_formats import bfloat16_bits
    w32, unit, bias = _random_layer(vocab, hidden, "float32")
    head32 = (w32, unit, np.zeros_like(bias))
    rounded = bfloat16_bits(w32).view(np.int16)
    full, full_fed = _call(library, "MindglmNetworkStep",
                           arguments(decode, [layer["cache"].copy() for layer in layers], codes, head32, "float32"),
                           [(9, vocab), (3, 3)])
    greedy, greedy_fed = _call(library, "MindglmNetworkStep",
                               arguments(decode, [layer["cache"].copy() for layer in layers], codes, head32, "float32",
                                         rounded), [(9, vocab), (3, 3)])
    np.testing.assert_array_equal(greedy_fed, full_fed)
    _assert_greedy_rows(greedy, full)
    assert (greedy != full).any()     # the copy decided some logits
    # refused: a copy of another shape than the head's ([1, 1]: none)
    _call(library, "MindglmNetworkStep", arguments(decode, [layer["cache"].copy() for layer in layers], codes, head32,
                                                   "float32", rounded[:, :-1]), [(9, vocab), (3, 3)], status=2)
    # refused before any step: a window too short for the steps (3), a slot not where the mask admits it (2)
    for change, status in [(dict(last=np.int32([[5], [2], [9]])), 3), (dict(slot_mapping=decode["slot_mapping"] + 1), 2)]:
        caches = [layer["cache"].copy() for layer in layers]
        _call(library, "MindglmNetworkStep", arguments({**decode, **change}, caches, codes, head), [(9, vocab), (3, 3)],
              status=status)
        for layer, cache in zip(layers, caches):
            np.testing.assert_array_equal(cache, layer["cache"])
    # refused, with every cache as it was: a slot past the caches' end (3), a token id past the
    # vocabulary (3), a position past the tables (3), the last layer's format code (2)
    bad_code = codes[:2] + [np.int32([0, 0, 7, 0])]
    for change, bad_codes, status in [(dict(slot_mapping=np.int32([slots, 0, 1])), codes, 3),
                                      (dict(ids=np.int32([[0], [vocab], [1]])), codes, 3),
                                      (dict(positions=np.int32([[[0]], [[1]], [[positions]]])), codes, 3),
                                      ({}, bad_code, 2)]:
        caches = [layer["cache"].copy() for layer in layers]
        _call(library, "MindglmNetworkStep", arguments({**step, **change}, caches, bad_codes),
              [(len(step["logits_index"]), vocab + 3), (1, len(step["logits_index"]))], status=status)
        for layer, cache in zip(layers, caches):
            np.testing.assert_array_equal(cache, layer["cache"])


@pytest.mark.parametrize("isa", ["native", "avx2", "portable"])
def test_every_simd_level_matches_numpy(isa):
    """The library built for each instruction-set cap (AVX-512 where this CPU has it, AVX2, plain
    C++) gives the linear kernels' numpy results on odd shapes, and the decode attention's."""
    from mindglm.kernels.build import cpu_features, kernel_simd, library_path
    has = cpu_features()
    expected = {"portable": "scalar", "avx2": "avx2" if "avx2" in has else "scalar",
                "native": "avx512" if "avx512f" in has else ("avx2" if "avx2" in has else "scalar")}
    assert kernel_simd(isa) == expected[isa]
    library = library_path(isa)
    kernels = {"int8": "MatmulInt8", "int4": "MatmulInt4", "float16": "MatmulF16", "float32": "MatmulF32"}
    # (1, 9, 8202): a decode row long enough for the two-rows-a-pass dot, an odd row left over
    for rows, out_features, in_features in [(1, 37, 130), (1, 9, 66), (5, 41, 98), (4, 3, 2), (1, 9, 8202)]:
        x = RNG.standard_normal((rows, in_features)).astype(np.float32)
        w = RNG.standard_normal((out_features, in_features)).astype(np.float32)
        for fmt, name in kernels.items():
            if fmt.startswith("int"):   # every byte value, -8 / -128 included (quantize_rows stops at +-7 / +-127)
                q = RNG.integers(-128, 128, (out_features, in_features // (2 if fmt == "int4" else 1)), dtype=np.int8)
                scale = RNG.uniform(0.01, 1, out_features).astype(np.float32)
                inputs, want = [x, q, scale], reference(x, fmt, q, scale, None)
            else:
                stored = w.astype(np.float16) if fmt == "float16" else w
                inputs, want = [x, stored], reference(x, fmt, stored, None, None)
            (got,) = _call(library, name, inputs, [(rows, out_features)])
            _assert_close(got, want)   # the scalar build sums 8202 terms in one float32 accumulator
    heads, kv_heads, dim, keys, slots = 4, 2, 24, 37, 50
    q = RNG.standard_normal((2, heads, dim)).astype(np.float32)
    cache = RNG.standard_normal((2, slots, kv_heads, dim)).astype(np.float32)
    kv_slots = RNG.integers(0, slots, (2, keys)).astype(np.int32)
    allowed = RNG.random((2, keys)) < 0.6
    (got,) = _call(library, "MindglmCacheAttention",
                   [q, cache[0], cache[1], kv_slots, allowed, np.float32([0.2, 1.0])], [q.shape])
    np.testing.assert_allclose(got, _attention_reference(q, cache[0], cache[1], kv_slots, allowed, 0.2, 1.0),
                               rtol=1e-5, atol=1e-5, err_msg=isa)


POOL_WITHOUT_SPIN = """
import sys
import numpy as np
sys.path.insert(0, {tests!r})
from test_kernels import _assert_close, _call, reference
from mindglm.kernels.build import library_path

rng = np.random.default_rng(3)
x = rng.standard_normal((1, 1024)).astype(np.float32)
w = rng.standard_normal((777, 1024)).astype(np.float32)   # 3 MB: split over both threads
first = None
for _ in range(300):
    (got,) = _call(library_path(), "MatmulF32", [x, w], [(1, 777)])
    first = got if first is None else first
    assert np.array_equal(got, first)          # each row is one thread's sum: the same every call
_assert_close(first, reference(x, "float32", w, None, None))
"""


def test_kernel_pool_sleeping_workers():
    """MINDGLM_KERNEL_SPIN_US=0: the pool's worker sleeps on its futex after every kernel and each
    call wakes it (the caller sleeps until the worker's half is done): 300 threaded calls in a row
    give numpy's result every time, and none is lost (a missed wake-up would hang: timeout)."""
    import os
    import subprocess
    import sys
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, MINDGLM_KERNEL_SPIN_US="0", MINDGLM_KERNEL_THREADS="2")
    result = subprocess.run([sys.executable, "-c", POOL_WITHOUT_SPIN.format(tests=tests)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
