"""sail_dist: a dual-backend (Ascend NPU / NVIDIA GPU) trainer for SAIL-VL2-style vision-language models.

One import package, `sail_dist`, laid out as it installs: a plain source checkout runs with `PYTHONPATH=.` and
no install, and nothing at the repository root shadows a PyPI package (no top-level `kernels/` etc.).
"""
from setuptools import find_packages, setup

setup(
    name="sail_dist",
    version="0.1.0",
    description="Dual-backend (Ascend NPU + NVIDIA GPU) trainer for SAIL-VL2-style vision-language models",
    python_requires=">=3.10",
    packages=find_packages(include=["sail_dist", "sail_dist.*"]),
    install_requires=[
        # CPU installs: pin torch==2.13.0 yourself first (an unpinned torch pulls a multi-GB CUDA build).
        "torch>=2.6",
        "numpy",
        "pyyaml",
        "safetensors",
        "tokenizers",
        "pillow",
        "tensorboard",
    ],
    extras_require={
        "gpu": ["deepspeed==0.19.8", "triton"],
        # torch_npu and MindSpeed are installed on Ascend clusters from their own channels (docs/npu.md);
        # megatron-core 0.12.1 is the version MindSpeed's stable branches patch.
        "npu": ["megatron-core==0.12.1"],
        "video": ["av"],  # video files (frame folders need nothing)
        "test": ["pytest", "hypothesis", "transformers>=4.51", "av", "psutil"],
    },
    entry_points={"console_scripts": [
        "sail-train=sail_dist.cli:main",
        "sail-data=sail_dist.data.cli:main",
        "sail-soup=sail_dist.model.soup:main",
        "sail-probe=sail_dist.probe.experts:main",
        "sail-eval=sail_dist.eval.cli:main",
        "sail-rl-filter=sail_dist.rl.filter:main",
        "sail-rl-harvest=sail_dist.rl.harvest:main",
    ]},
)
