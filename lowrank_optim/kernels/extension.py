"""Loader of the compiled CUDA extension ``lowrank_optim._C`` (sources in ``csrc/``).

The extension is a plain shared library: loading it runs its
``TORCH_LIBRARY_IMPL(lowrank_optim, CUDA, m)`` blocks, which register CUDA kernels for ops
whose schemas and default kernels :mod:`lowrank_optim.ops` defines.  For CUDA tensors the
dispatcher then prefers the CUDA kernel over the default (CompositeExplicitAutograd) one;
every other device keeps the default.  Callers never see which kernel ran.

:mod:`lowrank_optim.ops` calls :func:`load_extension` once, at import:

* ``LOWRANK_OPTIM_DISABLE_EXT=1`` skips it (the default kernels run everywhere);
* ``LOWRANK_OPTIM_EXT_PATH=/path/to/library.so`` loads that library instead of the installed
  ``lowrank_optim._C`` (what :func:`build_jit` returns; ``bench/gpu_check.sh`` builds once
  and hands the path to every later process this way);
* no extension on a machine without a usable CUDA device: silence, nothing to speed up;
* no extension on a CUDA machine, or an extension that fails to load (built against another
  torch, a missing cuBLAS): one ``RuntimeWarning`` naming the error and the fix, then the
  default kernels run.

:func:`build_jit` compiles ``csrc/`` in place with ``torch.utils.cpp_extension.load`` for a
source checkout on a GPU machine (``pip install -e .`` without a toolkit at install time).
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import torch

#: Setting this environment variable to 1 keeps the extension unloaded.
DISABLE_ENV = "LOWRANK_OPTIM_DISABLE_EXT"
#: A built library to load instead of the installed ``lowrank_optim._C`` (e.g. build_jit's).
PATH_ENV = "LOWRANK_OPTIM_EXT_PATH"
MODULE = "lowrank_optim._C"
#: The sources of a source checkout (absent from a wheel, which ships the built library).
CSRC = Path(__file__).resolve().parents[2] / "csrc"

_state = {"attempted": False, "loaded": False}


def cuda_sources(folder: Path) -> list[str]:
    """The translation units of the extension: every ``.cu`` and ``.cpp`` file (headers are not)."""
    return sorted(str(p) for pattern in ("*.cu", "*.cpp") for p in folder.glob(pattern))


def extension_loaded() -> bool:
    """True when the CUDA kernels of ``lowrank_optim._C`` are registered in this process."""
    return _state["loaded"]


def disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _library_path() -> str | None:
    """The library to load: ``LOWRANK_OPTIM_EXT_PATH`` when set, else where setup.py put
    ``lowrank_optim._C``, found without importing it (it is no Python module)."""
    explicit = os.environ.get(PATH_ENV, "").strip()
    if explicit:
        return explicit  # a missing file fails in the load, with the one warning
    try:
        spec = importlib.util.find_spec(MODULE)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None else None


def _load_library(path: str) -> None:
    torch.ops.load_library(path)


def _cuda_machine() -> bool:
    # torch.version.cuda first: a CPU wheel never asks the driver anything.
    return torch.version.cuda is not None and torch.cuda.is_available()


def _warn(problem: str) -> None:
    warnings.warn(
        f"lowrank_optim: {problem}; the pure-PyTorch kernels run instead (correct, slower). "
        "Fix: reinstall from a source checkout on a machine with a CUDA toolkit and a CUDA build of "
        "torch (LOWRANK_OPTIM_BUILD_EXT=1 pip install -e .), or call "
        "lowrank_optim.kernels.extension.build_jit(); "
        f"set {DISABLE_ENV}=1 to silence this.",
        RuntimeWarning,
        stacklevel=3,
    )


def load_extension() -> bool:
    """Load ``lowrank_optim._C`` once per process; returns :func:`extension_loaded`.

    Idempotent: later calls return the first call's outcome without warning again.
    """
    if _state["attempted"]:
        return _state["loaded"]
    _state["attempted"] = True
    if disabled():
        return False
    path = _library_path()
    if path is None:
        if _cuda_machine():
            _warn("the CUDA extension lowrank_optim._C is not built")
        return False
    try:
        _load_library(path)
    except (OSError, RuntimeError, ImportError) as err:
        # torch.ops.load_library re-raises the loader's error as a bare "Could not load this
        # library"; the cause holds what matters (an undefined symbol, a missing libcublas).
        cause = f"; {err.__cause__}" if err.__cause__ is not None else ""
        _warn(f"the CUDA extension {path} failed to load ({type(err).__name__}: {err}{cause})")
        return False
    _state["loaded"] = True
    return True


def build_jit(verbose: bool = False) -> str:
    """Compile ``csrc/`` with ``torch.utils.cpp_extension.load``, register its kernels in
    this process and return the path of the built library.

    Needs a source checkout, a CUDA toolkit (``nvcc``) and a CUDA build of torch; cuBLAS,
    cuSOLVER and cuSPARSE come from the toolkit or, where it lacks them, from torch's NVIDIA
    wheels (:mod:`lowrank_optim.kernels.toolkit`, as setup.py does).  The build is cached
    under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) for the
    architectures in ``TORCH_CUDA_ARCH_LIST`` (default: the visible GPUs').  Another process
    loads the same library by setting ``LOWRANK_OPTIM_EXT_PATH`` to the returned path.  Call
    it before the first op call of the process.
    """
    from torch.utils.cpp_extension import CUDA_HOME, load

    from .toolkit import build_flags

    sources = cuda_sources(CSRC)
    if not sources:
        raise FileNotFoundError(f"no CUDA sources under {CSRC}: build_jit needs a source checkout")
    flags = build_flags(CUDA_HOME, torch.version.cuda)
    if flags.missing:
        raise RuntimeError(f"build_jit: the build lacks {'; '.join(flags.missing)} (CUDA_HOME={CUDA_HOME})")
    path = load(
        name="lowrank_optim_C",
        sources=sources,
        extra_cflags=["-O3", *flags.cxx],  # torch adds the standard its headers need
        extra_cuda_cflags=["-O3"],
        # The randomized SVD launchers call cuBLAS and cuSOLVER directly.
        extra_ldflags=[*(f"-l{name}" for name in flags.libraries), *flags.link],
        is_python_module=False,  # a plain library: loading it runs the registrations
        verbose=verbose,
    )
    _state["attempted"] = True
    _state["loaded"] = True
    return str(path)
