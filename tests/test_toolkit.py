"""Where the extension's build finds cuBLAS, cuSOLVER and cuSPARSE (lowrank_optim/kernels/toolkit.py),
on fake toolkit and wheel folders: what CUDA_HOME has is used as it is, what it lacks comes
from the NVIDIA wheels without shadowing it, and what is nowhere is reported."""
from __future__ import annotations

from pathlib import Path

import pytest

from lowrank_optim.kernels import toolkit


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


@pytest.fixture
def folders(tmp_path, monkeypatch):
    home, wheel = tmp_path / "cuda", tmp_path / "site-packages" / "nvidia" / "cu13"
    (home / "include").mkdir(parents=True)
    (home / "lib64").mkdir()
    monkeypatch.setattr(toolkit, "wheel_dirs", lambda version: [wheel])
    return home, wheel


def test_a_full_toolkit_is_used_as_it_is(folders):
    home, wheel = folders
    for header in toolkit.HEADERS:
        touch(home / "include" / header)
        touch(wheel / "include" / header)
    for name in toolkit.LIBRARIES:
        touch(home / "lib64" / f"lib{name}.so")
    flags = toolkit.build_flags(home, "13.0")
    assert flags.cxx == [] and flags.link == [] and not flags.missing
    assert flags.libraries == list(toolkit.LIBRARIES)


def test_what_the_toolkit_lacks_comes_from_the_wheels_after_it(folders):
    home, wheel = folders
    touch(home / "include" / "cublas_v2.h")
    for header in ("cusolverDn.h", "cusparse.h"):
        touch(wheel / "include" / header)
    touch(home / "lib64" / "libcublas.so")
    solver = touch(wheel / "lib" / "libcusolver.so.12")
    flags = toolkit.build_flags(home, "13.0")
    assert flags.cxx == ["-idirafter", str(wheel / "include")]  # once, and searched after every -I
    assert flags.libraries == ["cublas"]
    assert flags.link == [str(solver), f"-Wl,-rpath,{solver.parent}"]  # by file: no libcusolver.so there
    assert not flags.missing


def test_what_is_nowhere_is_reported(folders):
    home, _ = folders
    flags = toolkit.build_flags(home, "13.0")
    assert sorted(m.split(" ")[0] for m in flags.missing) == sorted(
        [*toolkit.HEADERS, *(f"lib{name}.so" for name in toolkit.LIBRARIES)]
    )


def test_wheel_roots_prefer_the_cuda_major_release(tmp_path, monkeypatch):
    base = tmp_path / "nvidia"
    for sub in ("cu13", "cu12", "cublas"):
        (base / sub).mkdir(parents=True)

    spec = type("Spec", (), {})()
    spec.submodule_search_locations = [str(base)]
    monkeypatch.setattr(toolkit.importlib.util, "find_spec", lambda name: spec)
    assert toolkit.wheel_dirs("13.0") == [base / "cu13", base / "cublas"]
    assert toolkit.wheel_dirs(None) == [base / "cublas"]
