"""sail_dist: a dual-backend (Ascend NPU / NVIDIA GPU) trainer for SAIL-VL2-style vision-language models.

One import package, `sail_dist`. The top-level folders backends/, parallel/ and kernels/ install as
sail_dist.backends, sail_dist.parallel and sail_dist.kernels, so nothing generic lands in site-packages.
"""
from setuptools import find_packages, setup

_MAPPED = {"backends": "sail_dist.backends", "parallel": "sail_dist.parallel", "kernels": "sail_dist.kernels"}


def _packages() -> tuple[list[str], dict[str, str]]:
    packages = find_packages(include=["sail_dist", "sail_dist.*"])
    package_dir = {"sail_dist": "sail_dist"}
    for folder, name in _MAPPED.items():
        package_dir[name] = folder
        packages.append(name)
        packages += [f"{name}.{sub}" for sub in find_packages(where=folder)]
    return packages, package_dir


packages, package_dir = _packages()

setup(
    name="sail_dist",
    version="0.1.0",
    description="Dual-backend (Ascend NPU + NVIDIA GPU) trainer for SAIL-VL2-style vision-language models",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
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
    entry_points={"console_scripts": ["sail-train=sail_dist.cli:main"]},
)
