"""sparseffn: activation-sparsity acceleration for dense transformers LLMs."""
from setuptools import find_packages, setup

setup(
    name="sparseffn",
    version="0.1.0",
    description="Activation sparsity (TEAL, CATS, CHESS, WINA, top-k) for Hugging Face models, "
    "with Triton kernels that skip inactive weights during decoding",
    # bench/ and scripts/ run from the source checkout; they are not installed.
    packages=find_packages(include=["sparseffn*", "triton_kernels*", "calibrate*"]),
    # The CPU decode ops are compiled on the user's machine at first use (triton_kernels.cpu).
    package_data={"triton_kernels.cpu": ["ops.cpp"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "transformers>=4.48",
        "peft>=0.13",
        "datasets>=2.20",
        "safetensors>=0.4",
        "gguf>=0.10",
        "numpy",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-xdist>=3", "pytest-benchmark>=4", "rdata", "accelerate>=1.0",
                "lm-eval>=0.4.5"],
        # sparseffn.finetune: the Trainer needs accelerate (peft is a core dependency)
        "finetune": ["accelerate>=1.0"],
        # sparseffn eval --harness lm-eval (sparseffn.eval.harness)
        "lm-eval": ["lm-eval>=0.4.5"],
    },
    entry_points={"console_scripts": ["sparseffn=sparseffn.cli:main"]},
)
