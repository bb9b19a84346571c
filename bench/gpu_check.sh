#!/usr/bin/env bash
# One command for a day with one H100/H200-class GPU: build the CUDA extension, run the CUDA
# tests, the kernel benchmark and the GaLore step comparison at LLaMA-1B shapes, and the
# CUDA memory peaks per phase; write OUT_DIR/summary.md and JSON.  Under 8 minutes.
#
#   bash bench/gpu_check.sh OUT_DIR                          # from anywhere; runs in the repo root
#   GPU_CHECK_ALLOW_CPU=1 bash bench/gpu_check.sh OUT_DIR    # dry run on CPU: tiny shapes, same plumbing
#
# Stages, in order, each under `timeout`; one that fails or runs out of time is recorded
# and the next one runs anyway:
#   env      python/torch/CUDA/GPU, nvcc, which optional packages are there
#   build    lowrank_optim.kernels.extension.build_jit() for this GPU's architecture; the
#            library's path goes to every later stage as LOWRANK_OPTIM_EXT_PATH
#   tests    pytest tests/test_cuda*.py (junit report: tests.xml)
#   kernels  bench/bench_kernels.py at LLaMA-1B shapes: batched rSVD vs the best PyTorch path,
#            INT4 fused product vs dequantize + matmul and what the public op picked (targets 1.5x)
#   step     GaLore steady/refresh/amortized step vs galore_torch, one LLaMA-1B block (target 0.5x),
#            with fp32 and with bf16 products (product_dtype="bfloat16")
#   memory   CUDA allocator peak per phase (forward, backward, step, refresh step)
#   summary  OUT_DIR/summary.md, OUT_DIR/summary.json
# Files: OUT_DIR/<stage>.json (status, exit code, seconds, time box), <stage>.details.json
# (what the stage measured), <stage>.log, tests.xml, kernels/kernels.{md,json}.
#
# Environment:
#   GPU_CHECK_BUDGET_S   seconds for all stages together (default 450: the run stays under 8 minutes
#                        with the start-up and the summary); each stage gets its own cap or what
#                        is left of the budget, whichever is less
#   GPU_CHECK_WHEELS     a folder of wheels to install first (offline, --no-deps, into OUT_DIR/site):
#                        the peers a GPU image may lack, e.g. galore-torch (the step stage needs it)
#   PYTHON               the interpreter (default python3)
set -uo pipefail  # no -e: a failing stage is recorded, not fatal

if [ $# -ne 1 ]; then
    echo "usage: bash bench/gpu_check.sh OUT_DIR" >&2
    exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1" || exit 2
OUT="$(cd "$1" && pwd)"
cd "$REPO" || exit 2
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-450}"
DRY="${GPU_CHECK_ALLOW_CPU:-0}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS

if [ "$DRY" != 1 ] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no usable CUDA GPU here (set GPU_CHECK_ALLOW_CPU=1 for the CPU dry run)" >&2
    exit 2
fi
if [ -n "${GPU_CHECK_WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$OUT/site" "$GPU_CHECK_WHEELS"/*.whl \
        && export PYTHONPATH="$PYTHONPATH:$OUT/site" \
        || echo "gpu_check: could not install the wheels of $GPU_CHECK_WHEELS (the stages run without them)" >&2
fi

# run_stage NAME CAP_S COMMAND...: run under `timeout`, log to NAME.log, record NAME.json.
# The time box is the stage's cap or what the budget has left (keeping 15 s for each later
# stage), whichever is smaller; a stage left with under 10 s is skipped.
REMAINING_STAGES=6
run_stage() {
    local name="$1" cap="$2"
    shift 2
    REMAINING_STAGES=$((REMAINING_STAGES - 1))
    local left=$((BUDGET - (SECONDS - START) - 15 * REMAINING_STAGES))
    local box=$((cap < left ? cap : left))
    local status code began=$SECONDS
    if [ "$box" -lt 10 ]; then
        status=skipped code=-1 box=0
        echo "skipped: the budget of ${BUDGET} s is spent" >"$OUT/$name.log"
    else
        echo "== $name (time box ${box} s): $*"
        timeout --signal=TERM --kill-after=10 "$box" "$@" >"$OUT/$name.log" 2>&1
        code=$?
        case "$code" in
            0) status=passed ;;
            124 | 137) status=timeout ;;
            *) status=failed ;;
        esac
    fi
    local took=$((SECONDS - began))
    "$PY" - "$OUT/$name.json" "$name" "$status" "$code" "$took" "$box" "$name.log" "$*" <<'PY'
import json, sys
path, name, status, code, took, box, log, command = sys.argv[1:]
record = {"stage": name, "status": status, "exit_code": int(code), "seconds": int(took), "timeout_s": int(box),
          "log": log, "command": command}
open(path, "w").write(json.dumps(record, indent=2) + "\n")
PY
    echo "   $name: $status (exit $code, ${took} s)"
    tail -n 3 "$OUT/$name.log" | sed 's/^/   | /'
}

if [ "$DRY" = 1 ]; then
    # One thread: with galore_torch's import chain (bitsandbytes) a second OpenMP runtime is
    # loaded, and two-thread LAPACK calls then spin for ~0.5 s each on a 2-core machine.
    export OMP_NUM_THREADS=1
    TINY=(--tiny)
    KERNEL_ARGS=(--device cpu --quick --ranks 8 --layers 1 --repeats 1)
    STEP_ARGS=(--tiny --repeats 1 --steady-steps 2)
else
    TINY=()
    # LLaMA-1B shapes: ranks 128 and 512 (the paper's), two blocks per batch; 3 rounds each.
    KERNEL_ARGS=(--device cuda --models 1b --ranks 128 512 --layers 2 --repeats 3)
    STEP_ARGS=(--repeats 3 --steady-steps 10)
    # One architecture, this GPU's, keeps the build to a minute or two.
    if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
        TORCH_CUDA_ARCH_LIST="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
        export TORCH_CUDA_ARCH_LIST
    fi
fi
export TORCH_EXTENSIONS_DIR="$OUT/torch_extensions"

run_stage env 60 "$PY" bench/gpu_check.py env "$OUT"
run_stage build 240 "$PY" bench/gpu_check.py build "$OUT"
LIBRARY="$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("library", ""))' "$OUT/build.details.json" 2>/dev/null)"
if [ -n "$LIBRARY" ] && [ -f "$LIBRARY" ]; then
    export LOWRANK_OPTIM_EXT_PATH="$LIBRARY"  # every later process loads the library just built
fi
run_stage tests 150 "$PY" -m pytest tests/test_cuda.py tests/test_cuda_int4.py tests/test_cuda_rsvd.py -q -rfEs \
    -p no:cacheprovider --junitxml="$OUT/tests.xml"
run_stage kernels 150 "$PY" bench/gpu_check.py kernels "$OUT" -- "${KERNEL_ARGS[@]}" --out "$OUT/kernels"
run_stage step 120 "$PY" bench/gpu_check.py step "$OUT" "${STEP_ARGS[@]}"
run_stage memory 90 "$PY" bench/gpu_check.py memory "$OUT" "${TINY[@]}"

"$PY" bench/gpu_check.py summary "$OUT" >"$OUT/summary.log" 2>&1 || echo "gpu_check: the summary failed (see $OUT/summary.log)" >&2
echo "gpu_check: $((SECONDS - START)) s; summary: $OUT/summary.md"
# Exit status: 0 when every stage passed, 1 otherwise (the summary says which and why).
"$PY" -c 'import json, sys; sys.exit(1 if json.load(open(sys.argv[1]))["failed"] else 0)' "$OUT/summary.json" 2>/dev/null
