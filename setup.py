"""Packaging for tpcomp-megatron.

The Triton kernels live in `tpcomp_megatron/kernels/`, not in a top-level `kernels/` folder: a
checkout's root is on sys.path under `python -m ...`, and there a top-level `kernels` shadows
Hugging Face's `kernels` package, which transformers (5.x) requires and imports by that name.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["tpcomp_megatron", "tpcomp_megatron.*"])
TRITON = "triton>=3.0,<3.10"  # see extras_require["triton"]

setup(
    name="tpcomp-megatron",
    version="0.1.0",
    description="Compressed tensor-parallel communication for Megatron-core inference",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    install_requires=[
        # torch first in install order matters on CPU machines: see README.
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.20",
        # megatron-core uses these without declaring them (dist_checkpointing hangs without psutil).
        "psutil>=5.9",
        "tqdm>=4.60",
        "numpy>=1.24",
        "safetensors>=0.4",
    ],
    extras_require={
        # Triton ships with CUDA builds of torch; CPU machines need it for TRITON_INTERPRET=1 tests.
        # Up to the newest Triton tested: 3.9.0 (CPU, interpreter, torch 2.13); on GPUs 3.6.0 (torch
        # 2.11), the only range where launches skip the JIT (kernels/launch.py, fast_launch_supported).
        "triton": [TRITON],
        "tools": [
            "transformers>=4.46",
            "gguf>=0.10",
            "accelerate>=0.30",
            "sentencepiece>=0.2",
            "matplotlib>=3.7",
        ],
        "test": [
            "pytest>=7.4",
            "pytest-timeout>=2.2",
            TRITON,
            "transformers>=4.46",
            "gguf>=0.10",
            "accelerate>=0.30",
            "sentencepiece>=0.2",
        ],
    },
    entry_points={"console_scripts": [
        # through console.py: the tool is imported inside the quiet warning filters (quiet.py)
        "tpcomp-convert=tpcomp_megatron.console:convert",
        "tpcomp-calibrate=tpcomp_megatron.console:calibrate",
        "tpcomp-eval-quality=tpcomp_megatron.console:eval_quality",
        "tpcomp-sensitivity=tpcomp_megatron.console:sensitivity",
        "tpcomp-tune=tpcomp_megatron.console:tune",
    ]},
)
