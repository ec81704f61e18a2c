"""Checkpoint readers and writers: PyTorch .bin (without torch), .safetensors, MindSpore .ckpt.

`weights.iter_mindglm_tensors` streams any of them as mindglm-named arrays; the `ckpt_convert`
command line is built on these modules.
"""
