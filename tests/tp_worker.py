"""One msrun worker of tests/test_tensor_parallel.py: loads each case's model split over the
launch's ranks (and, for comparison, whole in this process), runs it, and saves what it computed
to OUT/rank<r>.npz for the test to check. Nothing is asserted here: a worker that fails only
exits non-zero, so the test sees every rank's numbers or one error.

    msrun --worker_num=2 --local_worker_num=2 --master_port=P --join=True tests/tp_worker.py OUT CASE...
        [--finetune YAML]

With --finetune, the same launch then runs tools/finetune.py on YAML data-parallel over its ranks
(one launch for every multi-process check: msrun's start is the suite's biggest cost).
"""
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
FIXTURES = os.path.join(HERE, "fixtures")

# case -> (model dir, load_model's quantize, golden file, prompts)
CASES = {
    "chatglm": ("models/chatglm-tiny", None, "models/chatglm-tiny/golden.npz", ("single", "mask")),
    "chatglm2": ("models/chatglm2-tiny", None, "models/chatglm2-tiny/golden.npz", ("single", "batch")),
    "chatglm3": ("models/chatglm3-tiny", None, "models/chatglm3-tiny/golden.npz", ("single", "batch")),
    # stored int8 (THUDM's format) and int4 (packed along the input axis that row-parallel cuts)
    "chatglm2-int8": ("quant/chatglm2-quant/int8", None, "quant/chatglm2-quant/golden_int8.npz", ("single", "batch")),
    "chatglm-int4": ("quant/chatglm-quant/int4", None, "quant/chatglm-quant/golden_int4.npz", ("single",)),
    # fp weights quantized on load: a row-parallel shard must get its full row's scale
    "chatglm3-q8": ("models/chatglm3-tiny", "int8", None, ("single", "batch")),
    # peft LoRA kept beside column- (qkv, [gate | up]) and row-parallel (dense) layers: the new
    # computation (merged, a share's weights are the share of the merged ones, which
    # test_lora_on_a_share_is_the_share_of_the_adapted_layer checks without a launch)
    "chatglm3-lora-unmerged": ("adapters/lora/chatglm3-lora/base", None, "adapters/lora/chatglm3-lora/golden.npz",
                               ("single",)),
}
# case -> (LoRA dir, merge it into the weights)
ADAPTERS = {"chatglm3-lora-unmerged": ("adapters/lora/chatglm3-lora/adapter", False)}


def run_case(mindglm, rank, case, out):
    path, quantize, golden_file, prompts = CASES[case]
    path = os.path.join(FIXTURES, path)
    golden = dict(np.load(os.path.join(FIXTURES, golden_file))) if golden_file else \
        dict(np.load(os.path.join(path, "golden.npz")))
    adapter, merge = ADAPTERS.get(case, (None, True))
    options = dict(quantize=quantize, merge_adapter=merge,
                   adapter=adapter and os.path.join(FIXTURES, adapter))
    split = mindglm.load_model(path, tensor_parallel=2, **options)  # msrun's scheduler process stops here
    whole = mindglm.load_model(path, tensor_parallel=1, **options)
    for prompt in prompts:
        ids, mask = golden[f"{prompt}_input_ids"], golden.get(f"{prompt}_attention_mask")
        new = golden[f"{prompt}_generated"].shape[1] - ids.shape[1]
        for name, model in (("whole", whole), ("split", split)):
            out[f"{case}/{prompt}/{name}/logits"] = model.logits(ids, attention_mask=mask)
            out[f"{case}/{prompt}/{name}/generated"] = model.generate(
                ids, attention_mask=mask, max_new_tokens=new, eos_token_id=-1, use_past=True)
        out[f"{case}/{prompt}/golden"] = golden[f"{prompt}_generated"]
    # sampling without a seed: every rank must draw the same tokens
    out[f"{case}/sampled_from"] = golden["single_input_ids"]
    out[f"{case}/sampled"] = split.generate(golden["single_input_ids"], max_new_tokens=6, do_sample=True,
                                            top_k=50, eos_token_id=-1)
    out[f"{case}/cache_heads"] = np.array(split.network.layers[0].attention.cache.key.shape[1])


def main():
    out_dir, cases = sys.argv[1], sys.argv[2:]
    finetune_config = None
    if "--finetune" in cases:
        at = cases.index("--finetune")
        finetune_config, cases = cases[at + 1], cases[:at] + cases[at + 2:]
    import mindspore as ms
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")
    import mindglm
    from mindglm.parallel.context import launched_rank
    rank = launched_rank()
    out = {}
    for case in cases:
        run_case(mindglm, rank, case, out)
    np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **out)
    if finetune_config:
        sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tools"))
        import finetune
        code = finetune.main(["--config", finetune_config])
        if code:
            sys.exit(code)


if __name__ == "__main__":
    main()
