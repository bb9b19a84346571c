#!/usr/bin/env bash
# Build lowrank_optim._C for sm_80 and sm_90 against the CUDA build of torch, on a machine
# without a GPU, and load it as far as a machine without a driver allows.  Run it before
# changing csrc/, setup.py or lowrank_optim/kernels/{extension,toolkit}.py; CI runs it too.
#
#   bash csrc/check_build.sh          # throwaway venv under ${TMPDIR:-/tmp}, deleted at the end
#   bash csrc/check_build.sh DIR      # venv in DIR (outside the repo), kept: a rerun skips the downloads
#
# Environment:
#   CUDA_HOME                     the toolkit to build with (default: the one the `nvcc` on PATH belongs to)
#   LOWRANK_OPTIM_CHECK_TORCH     torch version (default 2.13.0; PyPI's Linux x86_64 wheel is the CUDA build)
#   LOWRANK_OPTIM_CHECK_INDEX_URL package index (default https://pypi.org/simple)
#   TORCH_CUDA_ARCH_LIST          default "8.0;9.0" (A100, H100/H200)
#   MAX_JOBS                      parallel compile jobs (default: the number of cores)
#
# What it proves and what it cannot without a driver: csrc/README.md, "Checking a build
# without a GPU".  Exit status 0 only when every step passed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_VERSION="${LOWRANK_OPTIM_CHECK_TORCH:-2.13.0}"
INDEX_URL="${LOWRANK_OPTIM_CHECK_INDEX_URL:-https://pypi.org/simple}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}"

say() { printf '[check_build %4ds] %s\n' "$SECONDS" "$*"; }
die() { printf '[check_build %4ds] FAILED: %s\n' "$SECONDS" "$*" >&2; exit 1; }

if [ $# -ge 1 ]; then
    VENV="$(mkdir -p "$1" && cd "$1" && pwd)"
    KEEP=1
else
    VENV="$(mktemp -d "${TMPDIR:-/tmp}/lowrank_optim_check_build.XXXXXX")"
    KEEP=0
fi
case "$VENV/" in
    "$REPO"/*) die "the venv ($VENV) must be outside the repository: the build must not leave files in it" ;;
esac
WORK="$VENV/check_build"  # the copy of the sources, the build log
cleanup() { if [ "$KEEP" = 0 ]; then rm -rf "$VENV"; fi; }
trap cleanup EXIT

# ---------------------------------------------------------------- the toolkit
# nvcc may be a wrapper script (this project's machines have /usr/local/bin/nvcc exec'ing the
# real one), so the toolkit is where nvcc says it lives, not the folder above the wrapper.
if [ -z "${CUDA_HOME:-}" ]; then
    command -v nvcc >/dev/null 2>&1 || die "no nvcc on PATH and CUDA_HOME is unset: install a CUDA toolkit"
    probe="$(mktemp -d)"
    echo '__global__ void k() {}' >"$probe/k.cu"
    top="$(nvcc --dryrun -c "$probe/k.cu" -o "$probe/k.o" 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)"
    rm -rf "$probe"
    [ -n "$top" ] || die "could not read the toolkit folder from 'nvcc --dryrun'; set CUDA_HOME"
    CUDA_HOME="$(cd "$top" && pwd -P)"  # TOP is already <toolkit>/bin/..
fi
export CUDA_HOME
[ -x "$CUDA_HOME/bin/nvcc" ] || die "no $CUDA_HOME/bin/nvcc"
NVCC_VERSION="$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p')"
say "toolkit: $CUDA_HOME (nvcc $NVCC_VERSION); archs: $TORCH_CUDA_ARCH_LIST; jobs: $MAX_JOBS"

# ---------------------------------------------------------------- the venv
# The machine's pip configuration may point at a local mirror or a folder of wheels holding
# the CPU build of the same version (2.13.0+cpu satisfies ==2.13.0 and sorts above it), so
# every pip call here ignores it and asks the index alone; the result is verified below.
pypi() {
    env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_NO_INDEX -u PIP_CONSTRAINT \
        PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 \
        "$VENV/bin/python" -m pip "$@"
}
started=$SECONDS
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV" || die "python3 -m venv $VENV"
fi
have="$("$VENV/bin/python" -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>/dev/null || true)"
case "$have" in
    "$TORCH_VERSION"*" "[0-9]*) say "reusing $VENV (torch $have)" ;;
    *)
        say "installing torch==$TORCH_VERSION (CUDA build) from $INDEX_URL into $VENV: a few GB"
        pypi install --quiet --no-cache-dir --index-url "$INDEX_URL" --upgrade pip \
            || die "pip could not upgrade itself from $INDEX_URL (network?)"
        # pip >= 21.3 builds an editable install through PEP 660; older ones run the legacy
        # `setup.py develop`, which recent setuptools turns into an isolated build without torch.
        pypi install --quiet --no-cache-dir --index-url "$INDEX_URL" \
            "torch==$TORCH_VERSION" numpy ninja setuptools wheel \
            || die "could not install torch==$TORCH_VERSION from $INDEX_URL (network?)"
        ;;
esac
read -r TORCH_FULL TORCH_CUDA < <("$VENV/bin/python" -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>/dev/null) \
    || die "torch does not import in $VENV"
[ "$TORCH_CUDA" != "None" ] || die "torch $TORCH_FULL in $VENV is a CPU build (a local wheel won over the index?)"
if [ "${TORCH_CUDA%%.*}" != "${NVCC_VERSION%%.*}" ]; then
    # torch.utils.cpp_extension refuses a different major release outright (a minor one only warns).
    die "torch $TORCH_FULL is built with CUDA $TORCH_CUDA but nvcc is $NVCC_VERSION: point CUDA_HOME at a CUDA ${TORCH_CUDA%%.*}.x toolkit, or pick a torch built for CUDA ${NVCC_VERSION%%.*} (LOWRANK_OPTIM_CHECK_TORCH)"
fi
VENV_S=$((SECONDS - started))
say "venv ready: torch $TORCH_FULL, CUDA $TORCH_CUDA (${VENV_S} s)"

# ---------------------------------------------------------------- the build
# In a copy of the tracked and untracked-not-ignored files: an editable build writes
# lowrank_optim/_C*.so into the source tree, and in the repository that library (built
# against the CUDA torch) would break every import of the repository's own CPU venv.
started=$SECONDS
rm -rf "$WORK"
mkdir -p "$WORK/src"
git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1 || die "$REPO is not a git checkout (the file list comes from git)"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | xargs -0 cp --parents -t "$WORK/src")
say "building: LOWRANK_OPTIM_BUILD_EXT=1 pip install -e . --no-build-isolation --no-deps (log: $WORK/build.log)"
if ! (cd "$WORK/src" && PATH="$VENV/bin:$PATH" LOWRANK_OPTIM_BUILD_EXT=1 \
        pypi install -v --no-deps --no-build-isolation -e . >"$WORK/build.log" 2>&1); then
    echo "---- compiler and linker errors (full log: $WORK/build.log)" >&2
    # The compiler's and linker's own lines first: pip's traceback below them is noise.
    grep -n -B 4 -A 8 -E '(error|undefined reference)' "$WORK/build.log" | grep -v -E '^[0-9]+[-:] +(File|\^|raise|return|json_out)' \
        | head -n 80 >&2 || tail -n 80 "$WORK/build.log" >&2
    die "the build failed"
fi
warnings="$(grep -c -E '(^|[^a-z])warning[: ]' "$WORK/build.log" || true)"
LIBRARY="$(find "$WORK/src/lowrank_optim" -maxdepth 1 -name '_C*.so' | head -n 1)"
[ -n "$LIBRARY" ] || die "the build succeeded but left no lowrank_optim/_C*.so"
BUILD_S=$((SECONDS - started))
say "built $(basename "$LIBRARY") ($(du -k "$LIBRARY" | cut -f1) KiB, $warnings compiler warning line(s), ${BUILD_S} s)"
if [ "$warnings" != 0 ]; then
    grep -n -E '(^|[^a-z])warning[: ]' "$WORK/build.log" | head -n 20
fi

# ---------------------------------------------------------------- what the library holds
started=$SECONDS
CUOBJDUMP="$(command -v cuobjdump || true)"
[ -n "$CUOBJDUMP" ] || [ ! -x "$CUDA_HOME/bin/cuobjdump" ] || CUOBJDUMP="$CUDA_HOME/bin/cuobjdump"
if [ -z "$CUOBJDUMP" ]; then  # the triton wheel, a torch dependency, carries one
    CUOBJDUMP="$(find "$VENV" -path '*triton/backends/nvidia/bin/cuobjdump' -type f 2>/dev/null | head -n 1)"
fi
if [ -n "$CUOBJDUMP" ]; then
    cubins="$("$CUOBJDUMP" --list-elf "$LIBRARY" 2>&1)" || die "cuobjdump --list-elf failed: $cubins"
    # One cubin per .cu file and architecture (the listing does not name the source file).
    units=$(find "$REPO/csrc" -maxdepth 1 -name '*.cu' | wc -l)
    for arch in ${TORCH_CUDA_ARCH_LIST//;/ }; do
        sm="sm_${arch//./}"
        found=$(grep -c "\.$sm\.cubin" <<<"$cubins" || true)
        [ "$found" = "$units" ] || die "$found $sm cubin(s) in the library for $units .cu file(s):
$cubins"
    done
    say "machine code: $(grep -o 'sm_[0-9]*' <<<"$cubins" | sort | uniq -c | tr -s ' \n' ' ')(cubins per architecture)"
else
    say "no cuobjdump found: the machine code per architecture is not listed"
fi

# ---------------------------------------------------------------- loading it, no driver
# The registrations the sources make (m.impl("name", ...)): the loaded library must provide
# every one of them for the CUDA key, and nothing else.
EXPECTED="$(grep -h -o 'm\.impl("[a-z0-9_]*"' "$REPO"/csrc/*.cpp | sed 's/m\.impl("\(.*\)"/\1/' | sort -u | tr '\n' ' ')"
(cd "$WORK" && LOWRANK_OPTIM_CHECK_EXPECTED="$EXPECTED" LOWRANK_OPTIM_CHECK_LIBRARY="$LIBRARY" \
    "$VENV/bin/python" - <<'PY') || die "the load checks failed"
import os
import warnings

import torch

expected = os.environ["LOWRANK_OPTIM_CHECK_EXPECTED"].split()
library = os.environ["LOWRANK_OPTIM_CHECK_LIBRARY"]
driver = torch.cuda.is_available()
print(f"  torch {torch.__version__} (CUDA {torch.version.cuda}); a usable GPU: {driver}")

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import lowrank_optim  # defines the schemas, then loads lowrank_optim._C
    from lowrank_optim.kernels import extension, reference
problems = [str(w.message) for w in caught if "lowrank_optim" in str(w.message)]
assert not problems, f"import warned: {problems}"
where = extension._library_path()
assert where is not None and os.path.samefile(where, library), f"the import found {where}, not {library}"
# torch.ops.load_library is ctypes.CDLL: dlopen with RTLD_NOW, so a successful load means every
# undefined symbol resolved (a launcher declared in a .cpp but defined differently in a .cu,
# an ATen function outside the libraries torch has loaded), and the TORCH_LIBRARY_IMPL blocks ran:
# each m.impl checks its C++ signature against the schema ops.py defined, or throws.
assert extension.extension_loaded(), "lowrank_optim._C did not load"
print(f"  loaded {os.path.basename(library)}: every symbol resolved, every registration accepted its schema")

names = sorted(op.split("::")[1] for op in torch._C._dispatch_get_all_op_names() if op.startswith("lowrank_optim::"))
for name in expected:
    assert name in names, f"csrc registers {name}, which ops.py does not define"
def cuda_kernel(name):
    """Where the CUDA kernel of the op was registered (the dispatcher's own record), or None."""
    for line in torch._C._dispatch_dump(f"lowrank_optim::{name}").splitlines():
        if line.startswith("CUDA:"):
            return line
    return None


compiled = {n for n in names if "csrc/" in (cuda_kernel(n) or "")}
assert compiled == set(expected), f"csrc kernels registered for {sorted(compiled)}, expected {sorted(expected)}"
for n in names:  # the defaults stay registered for every other device
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lowrank_optim::{n}", "CompositeExplicitAutograd"), n
python_cuda = sorted(n for n in names if n not in compiled and cuda_kernel(n) is not None)
print(f"  CUDA kernels from csrc/ registered for: {', '.join(sorted(compiled))}")
print(f"  CUDA kernels from Python (ops.py) for: {', '.join(python_cuda) or 'none'}")

# With the extension loaded, CPU tensors still run the default kernels, unchanged.
gen = torch.Generator().manual_seed(0)
basis = torch.randn(40, 6, generator=gen)
packed, scales, zeros = torch.ops.lowrank_optim.int4_quantize(basis, 64)
grad = torch.randn(40, 9, generator=gen)
from lowrank_optim.kernels import int4

basis = int4.Int4Basis(packed, scales, zeros, 40, 6, 64, True)
for op in (torch.ops.lowrank_optim.int4_project, torch.ops.lowrank_optim.int4_project_fused):
    assert torch.equal(op(grad, *basis), reference.int4_product(grad, basis, back=False))
print("  CPU tensors still run the default kernels")
# On a GPU the public INT4 ops would weigh the fused kernel against dequantize + matmul.
assert int4.fused_kernel_registered(False) and int4.fused_kernel_registered(True)

# What needs a driver: a CUDA tensor cannot be made, so no CUDA kernel can be called here.
if not driver:
    try:
        torch.empty(1, device="cuda")
    except (RuntimeError, AssertionError) as err:
        print(f"  (expected without a driver) a CUDA tensor cannot be created: {str(err).splitlines()[0]}")
    else:
        raise AssertionError("a CUDA tensor was created although torch.cuda.is_available() is False")
PY
CHECK_S=$((SECONDS - started))

# ---------------------------------------------------------------- the JIT build (bench/gpu_check.sh's)
# build_jit compiles the same sources with the same flags through torch.utils.cpp_extension.load;
# another process then loads its library through LOWRANK_OPTIM_EXT_PATH.
started=$SECONDS
jit_library="$(cd "$WORK" && LOWRANK_OPTIM_DISABLE_EXT=1 TORCH_EXTENSIONS_DIR="$WORK/torch_extensions" \
    "$VENV/bin/python" -c 'from lowrank_optim.kernels.extension import build_jit; print(build_jit())' \
    2>"$WORK/jit.log" | tail -n 1)" || { tail -n 60 "$WORK/jit.log" >&2; die "build_jit failed (log: $WORK/jit.log)"; }
[ -f "$jit_library" ] || { tail -n 60 "$WORK/jit.log" >&2; die "build_jit returned '$jit_library', not a file"; }
if ! loaded="$(cd "$WORK" && LOWRANK_OPTIM_EXT_PATH="$jit_library" "$VENV/bin/python" -c '
import torch, lowrank_optim
from lowrank_optim.kernels import extension
assert extension.extension_loaded() and extension._library_path() == "'"$jit_library"'"
assert torch._C._dispatch_has_kernel_for_dispatch_key("lowrank_optim::int4_project_fused", "CUDA")
assert torch._C._dispatch_has_kernel_for_dispatch_key("lowrank_optim::batched_randomized_svd", "CUDA")
' 2>&1)"; then
    echo "$loaded" >&2
    die "the library build_jit made does not load through LOWRANK_OPTIM_EXT_PATH"
fi
JIT_S=$((SECONDS - started))
say "build_jit: built and loaded through LOWRANK_OPTIM_EXT_PATH ($(basename "$jit_library"), ${JIT_S} s)"
if command -v readelf >/dev/null 2>&1; then
    say "needs: $(readelf -d "$LIBRARY" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
fi
say "OK: venv ${VENV_S} s, build ${BUILD_S} s, checks ${CHECK_S} s, build_jit ${JIT_S} s; total ${SECONDS} s"
