"""ckpt_convert: THUDM / MindFormers GLM checkpoints <-> mindglm MindSpore checkpoints, streaming.

    python -m ckpt_convert --src <THUDM dir> --dst model.ckpt [--dtype bfloat16]
    python -m ckpt_convert --to-hf --src model.ckpt --dst <dir> [--config <THUDM dir>]

Reads PyTorch .bin (without torch), .safetensors and MindSpore .ckpt, one tensor in memory at a
time; the name maps live in `mindglm.checkpoint`.
"""
import sys

if sys.argv[:1] == ["-m"]:  # `python -m ckpt_convert` (argv[0] is "-m" while the package loads)
    from mindglm.requirements import require_packages
    require_packages(__file__, {"numpy": "numpy<2"}, command="python -m ckpt_convert")

from ckpt_convert.convert import convert, convert_to_hf  # noqa: E402
from mindglm.io.ms_ckpt import CkptWriter, read_ckpt, read_ckpt_entries  # noqa: E402
from mindglm.io.weights import iter_mindglm_tensors  # noqa: E402
from mindglm.io.safetensors_io import read_safetensors, write_safetensors  # noqa: E402
from mindglm.io.sources import find_weight_files, list_tensors  # noqa: E402
from mindglm.io.torch_bin import read_torch_bin, save_torch_bin  # noqa: E402
from mindglm.checkpoint import CheckpointError  # noqa: E402

__all__ = [
    "convert", "convert_to_hf", "iter_mindglm_tensors", "read_ckpt", "read_ckpt_entries", "CkptWriter",
    "read_safetensors", "write_safetensors", "read_torch_bin", "save_torch_bin", "find_weight_files",
    "list_tensors", "CheckpointError",
]
