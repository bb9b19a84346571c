"""Install lowrank_optim.

The CUDA extension in csrc/ is optional: ``LOWRANK_OPTIM_BUILD_EXT=auto`` (default) builds it
only when a CUDA toolkit and a CUDA build of torch are present, ``0`` never, ``1`` always
(failing loudly).  Without it every op runs its pure-PyTorch kernel.
"""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def cuda_extensions():
    import os

    mode = os.environ.get("LOWRANK_OPTIM_BUILD_EXT", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"setup.py: LOWRANK_OPTIM_BUILD_EXT must be auto, 0 or 1, got {mode!r}")
    # Translation units only (a header in csrc/ is not a source).
    sources = sorted(str(p.relative_to(HERE)) for pattern in ("*.cu", "*.cpp") for p in (HERE / "csrc").glob(pattern))
    if mode == "0" or not sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if mode == "1":
            raise
        return [], {}
    if mode == "auto" and (CUDA_HOME is None or torch.version.cuda is None):
        return [], {}
    if mode == "1" and (CUDA_HOME is None or torch.version.cuda is None):
        raise RuntimeError(
            "setup.py: LOWRANK_OPTIM_BUILD_EXT=1 needs a CUDA toolkit and a CUDA build of torch "
            f"(CUDA_HOME={CUDA_HOME}, torch.version.cuda={torch.version.cuda})"
        )
    # cuBLAS/cuSOLVER/cuSPARSE from CUDA_HOME, else from torch's NVIDIA wheels (a minimal
    # toolkit has nvcc but not them).  The helper is loaded by path: importing the package
    # here would import its ops before the build.
    flags = _toolkit().build_flags(CUDA_HOME, torch.version.cuda)
    if flags.missing:
        if mode == "1":
            raise RuntimeError("setup.py: LOWRANK_OPTIM_BUILD_EXT=1 but the build lacks " + "; ".join(flags.missing))
        return [], {}
    ext = CUDAExtension(
        "lowrank_optim._C",  # a plain library loaded by lowrank_optim/kernels/extension.py
        sources,
        # torch picks the C++ standard its headers need (C++20 in 2.13)
        extra_compile_args={"cxx": ["-O3", *flags.cxx], "nvcc": ["-O3"]},
        libraries=flags.libraries,  # the batched randomized SVD calls cuBLAS and cuSOLVER directly
        extra_link_args=flags.link,
    )
    return [ext], {"build_ext": BuildExtension}


def _toolkit():
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("_lowrank_optim_toolkit", HERE / "lowrank_optim" / "kernels" / "toolkit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ext_modules, cmdclass = cuda_extensions()

setup(
    name="lowrank_optim",
    version="0.1.0",
    description="Memory-efficient low-rank optimizers (GaLore family) for PyTorch",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lowrank_optim", "lowrank_optim.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "8bit": ["bitsandbytes>=0.45"],
        "dev": [
            "pytest>=8",
            "bitsandbytes==0.50.2",
            "galore-torch==1.0",
            "fira==1.0.2",
            "q-galore-torch==1.0",
            # Peers that bench/compare.py measures against (its tests list a missing one).
            "apollo-torch==1.0.3",
            "pytorch-optimizer==4.1.0",
            "torchao==0.18.0",
            "transformers>=5.23",
            "accelerate>=1.0",
            "tqdm",
            "matplotlib",
            "wandb",
            # The Triton INT4 kernel's tests run it on CPU under TRITON_INTERPRET=1; the
            # wheels are Linux-only, and elsewhere those tests skip.
            "triton; platform_system == 'Linux'",
        ],
        "bench": ["tqdm", "transformers>=5.23"],
        "transformers": ["transformers>=5.23,<6", "accelerate>=1.0"],
        "plot": ["matplotlib"],
        "wandb": ["wandb"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
