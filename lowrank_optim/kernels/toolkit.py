"""Where the build of ``lowrank_optim._C`` finds cuBLAS, cuSOLVER and cuSPARSE.

ATen's CUDA headers include ``cublas_v2.h``, ``cusolverDn.h`` and ``cusparse.h``, and the
randomized SVD links cuBLAS and cuSOLVER.  A full CUDA toolkit has them under
``CUDA_HOME``; a minimal one (``nvcc`` and the runtime only, as on this project's CI
machine, or a ``pip install torch`` machine with a system ``nvcc``) does not, but the CUDA
build of torch brings them as NVIDIA wheels (``site-packages/nvidia/cu13/{include,lib}``
for CUDA 13, ``nvidia/<library>/{include,lib}`` for CUDA 12).  :func:`build_flags` fills in
what ``CUDA_HOME`` lacks from those wheels and never shadows what it has: headers through
``-idirafter`` (searched after every ``-I``), libraries by file with an rpath to their
folder (the wheels ship only ``libcublas.so.13``-style names, which ``-lcublas`` would not
find, and torch does not load cuSOLVER before the first linear-algebra call).

Standalone on purpose: ``setup.py`` loads this file by path, before the package (or even
torch's CUDA state) can be imported.  Used by ``setup.py`` and
:func:`lowrank_optim.kernels.extension.build_jit`; docs/kernels.md, "Build modes".
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

#: The headers the ``.cpp`` sources need (directly or through ATen/cuda/CUDAContext.h),
#: with the library that ships each.
HEADERS = {"cublas_v2.h": "cublas", "cusolverDn.h": "cusolver", "cusparse.h": "cusparse"}
#: The libraries the extension calls directly (csrc/rsvd_ops.cpp).
LIBRARIES = ("cublas", "cusolver")


@dataclass
class BuildFlags:
    """Flags for the C++ compiler and the linker, and what was taken from where."""

    cxx: list[str] = field(default_factory=list)
    link: list[str] = field(default_factory=list)
    #: ``-l<name>`` libraries (found under ``CUDA_HOME``).
    libraries: list[str] = field(default_factory=list)
    #: Human-readable lines: where each header and library comes from.
    notes: list[str] = field(default_factory=list)
    #: What was found nowhere (the build will fail on it).
    missing: list[str] = field(default_factory=list)


def toolkit_dirs(cuda_home: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """The include and library folders of the toolkit at ``cuda_home``."""
    home = Path(cuda_home)
    includes = [home / "include", *sorted(home.glob("targets/*/include"))]
    libs = [home / "lib64", home / "lib", *sorted(home.glob("targets/*/lib"))]
    return [p for p in includes if p.is_dir()], [p for p in libs if p.is_dir()]


def wheel_dirs(cuda_version: str | None) -> list[Path]:
    """Roots (each with ``include/`` and ``lib/``) of the installed NVIDIA wheels, the
    ones of ``cuda_version``'s major release first."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    major = cuda_version.split(".")[0] if cuda_version else None
    roots: list[Path] = []
    for location in spec.submodule_search_locations:
        base = Path(location)
        if major is not None and (base / f"cu{major}").is_dir():
            roots.append(base / f"cu{major}")  # CUDA 13 layout: one folder for every library
        roots += [base / name for name in sorted(set(HEADERS.values())) if (base / name).is_dir()]  # CUDA 12 layout
    return roots


def _library_file(folder: Path, name: str) -> Path | None:
    """``lib<name>.so`` in ``folder``, else its versioned file (``lib<name>.so.13``)."""
    plain = folder / f"lib{name}.so"
    if plain.exists():
        return plain
    versioned = sorted(folder.glob(f"lib{name}.so.*"), key=lambda p: (len(p.name), p.name))
    return versioned[0] if versioned else None


def build_flags(cuda_home: str | os.PathLike | None, cuda_version: str | None) -> BuildFlags:
    """Flags that let the C++ sources and the link find every header in :data:`HEADERS`
    and every library in :data:`LIBRARIES`: ``CUDA_HOME`` first, then the NVIDIA wheels."""
    flags = BuildFlags()
    includes, libs = toolkit_dirs(cuda_home) if cuda_home else ([], [])
    roots = wheel_dirs(cuda_version)
    added: set[Path] = set()
    for header, owner in HEADERS.items():
        if any((d / header).exists() for d in includes):
            flags.notes.append(f"{header}: CUDA_HOME ({cuda_home})")
            continue
        found = next((r / "include" for r in roots if (r / "include" / header).exists()), None)
        if found is None:
            flags.missing.append(f"{header} (install nvidia-{owner}, or a CUDA toolkit that has it)")
            continue
        if found not in added:
            added.add(found)
            flags.cxx += ["-idirafter", str(found)]
        flags.notes.append(f"{header}: NVIDIA wheel ({found})")
    rpaths: list[str] = []
    for name in LIBRARIES:
        if any((d / f"lib{name}.so").exists() for d in libs):  # what -l<name> looks for
            flags.libraries.append(name)
            flags.notes.append(f"lib{name}: CUDA_HOME ({cuda_home})")
            continue
        found = next((f for r in roots if (f := _library_file(r / "lib", name)) is not None), None)
        if found is None:
            flags.missing.append(f"lib{name}.so (install nvidia-{name}, or a CUDA toolkit that has it)")
            continue
        flags.link.append(str(found))  # by file: its SONAME becomes the NEEDED entry
        if str(found.parent) not in rpaths:
            rpaths.append(str(found.parent))
        flags.notes.append(f"lib{name}: NVIDIA wheel ({found})")
    flags.link += [f"-Wl,-rpath,{path}" for path in rpaths]
    return flags
