"""mindglm: MindSpore-native ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B."""
from setuptools import find_packages, setup

setup(
    name="mindglm",
    version="0.1.0",
    description="MindSpore-native GLM chat models (ChatGLM-6B, ChatGLM2-6B, ChatGLM3-6B)",
    python_requires=">=3.9",
    packages=find_packages(include=["mindglm", "mindglm.*", "ckpt_convert", "ckpt_convert.*"]),
    package_data={"mindglm.kernels": ["*.cc"]},  # compiled on first use (mindglm/kernels/build.py)
    install_requires=[
        "mindspore==2.10.0",
        "numpy<2",  # MindSpore 2.10 wheels are built against the NumPy 1.x ABI
        "sentencepiece",
        "pyyaml",
        "safetensors",
    ],
    extras_require={
        # torch/transformers are reference oracles for tests only; never needed to run or convert.
        "test": ["pytest", "jieba", "rouge-chinese", "nltk"],
        # ADGEN scoring (tools/evaluate.py, mindglm/tuning/metrics.py), as THUDM's main.py.
        "tuning": ["jieba", "rouge-chinese", "nltk"],
        "reference": ["torch==2.13.0", "transformers", "peft"],
    },
)
