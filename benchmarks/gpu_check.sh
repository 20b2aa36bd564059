#!/usr/bin/env bash
# The prepared GPU check of issue 33: one command, at most 9 minutes on an H100/H200.
#
#   bash benchmarks/gpu_check.sh OUTDIR             # on a CUDA machine
#   CPU=1 bash benchmarks/gpu_check.sh OUTDIR       # dry run: the same plumbing, tiny sizes, on the CPU
#   bash benchmarks/gpu_check.sh --dry-run OUTDIR   # the same as CPU=1
#
# Parts, in order, each under its own `timeout` (a part that fails or runs over does not
# take the others with it), all inside TOTAL_SECONDS (540 on CUDA):
#   tests     the CUDA tests: python -m pytest -q -k cuda (every test that skips without
#             CUDA has "cuda" in its name; tests/test_gpu_check.py checks that)
#   bench     benchmarks/bench_dualize.py --quick: the default map, its step() and the
#             CUDA-graph rows side by side with torch.optim.Muon.step() on GPT-2 small's 48
#             hidden matrices; accuracy, roofline fraction, step() memory
#             (torch.cuda.max_memory_allocated) and the issue-33 acceptance lines
#   profile   benchmarks/profile_map.py: torch.profiler kernel tables of one map call and
#             one step() call (which kernels, what share, matmuls at what roofline fraction)
#   train     benchmarks/gpu_train_compare.py: GPT-2 small (12 layers, d=768, context 256)
#             with normgraph, Muon+AdamW and AdamW, same init and batches, bf16 autocast,
#             each run given the same share of the time left (lr decayed over that time)
#   autotune  (only if PARTS names it) profile_map.py --what map with
#             compile_mode="max-autotune-no-cudagraphs": the Triton-GEMM lever
#
# Environment: PARTS (default "tests bench profile train"), TOTAL_SECONDS, PYTHON (default
# python3), TRAIN_RUNS (default "normgraph:default muon:default adamw:default"), TRAIN_BATCH
# (default 32), RAW_DIR (where the parts write; default a fresh directory under /tmp).
#
# OUTDIR receives at most 8 files (the device tool brings back 8): gpu_check.log (everything
# printed), summary.txt (each part's exit status and seconds), raw.tar.gz (every part's raw
# output: logs, bench.json, the profile tables and gzipped traces, the training JSON/CSV/plot;
# re-packed after each part, so a run cut short keeps what finished), and copies of
# bench.log, profile_map.md, train_compare.md and train_compare.png for reading at once.
set -u -o pipefail

DRY=${CPU:-0}
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
if [[ $# -ne 1 ]]; then
    echo "usage: [CPU=1] $0 [--dry-run] OUTDIR" >&2
    exit 2
fi
OUTDIR=$1
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
PARTS=${PARTS:-"tests bench profile train"}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
RAW=${RAW_DIR:-$(mktemp -d /tmp/normgraph_gpu_check.XXXXXX)}
mkdir -p "$RAW"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [[ "$DRY" == "1" ]]; then
    TOTAL=${TOTAL_SECONDS:-600}
    export CUDA_VISIBLE_DEVICES=""  # the dry run is the CPU path, even on a GPU machine
else
    TOTAL=${TOTAL_SECONDS:-540}
fi
START=$(date +%s)
DEADLINE=$((START + TOTAL))

pack() {  # everything the parts wrote, into OUTDIR (8 files at most)
    tar -czf "$OUTDIR/raw.tar.gz.tmp" -C "$RAW" . 2>/dev/null && mv "$OUTDIR/raw.tar.gz.tmp" "$OUTDIR/raw.tar.gz"
    [[ -f "$RAW/bench.log" ]] && cp "$RAW/bench.log" "$OUTDIR/bench.log"
    [[ -f "$RAW/profile/profile_map.md" ]] && cp "$RAW/profile/profile_map.md" "$OUTDIR/profile_map.md"
    [[ -f "$RAW/train/train_compare.md" ]] && cp "$RAW/train/train_compare.md" "$OUTDIR/train_compare.md"
    [[ -f "$RAW/train/train_compare.png" ]] && cp "$RAW/train/train_compare.png" "$OUTDIR/train_compare.png"
    cp "$RAW/summary.txt" "$OUTDIR/summary.txt" 2>/dev/null
    return 0
}

run_part() {  # NAME LIMIT_SECONDS COMMAND...: run under timeout, tee to RAW/NAME.log, record rc
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - $(date +%s)))
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        echo "== $name: skipped, ${left}s left of ${TOTAL}s"
        echo "$name skipped 0s" >>"$RAW/summary.txt"
        return 0
    fi
    echo "== $name (timeout ${limit}s): $*"
    local t0 rc
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$RAW/$name.log"
    rc=${PIPESTATUS[0]}
    local secs=$(($(date +%s) - t0))
    if ((rc == 124 || rc == 137)); then
        echo "== $name: TIMED OUT after ${secs}s (rc $rc)"
    else
        echo "== $name: rc $rc in ${secs}s"
    fi
    echo "$name rc=$rc ${secs}s" >>"$RAW/summary.txt"
    pack
    return 0
}

has_part() { [[ " $PARTS " == *" $1 "* ]]; }

main() {
    cd "$REPO" || exit 2
    : >"$RAW/summary.txt"
    echo "# normgraph GPU check (issue 33): $(date -u '+%Y-%m-%d %H:%M:%S UTC'), dry run: $DRY, parts: $PARTS, budget ${TOTAL}s"
    echo "# host $(hostname), $(uname -srm), repo $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git here'))"
    echo "# raw output in $RAW, packed into $OUTDIR/raw.tar.gz"
    if [[ "$DRY" != "1" ]] && command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm,temperature.gpu,power.draw \
            --format=csv 2>&1 | sed 's/^/# /'
    fi
    "$PY" - "$DRY" <<'EOF' 2>&1 | sed 's/^/# /'
import platform, sys
import torch
print(f"python {platform.python_version()} ({sys.executable}), torch {torch.__version__}, cuda {torch.version.cuda}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {torch.cuda.get_device_name(0)}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
else:
    print("device: CPU (no CUDA)" + ("" if sys.argv[1] == "1" else " -- this is not a GPU machine"))
for mod in ("triton", "transformers", "matplotlib"):
    try:
        print(f"{mod} {__import__(mod).__version__}")
    except ImportError:
        print(f"{mod}: not installed")
import normgraph
print(f"normgraph from {normgraph.__file__}")
EOF
    if [[ "$DRY" != "1" ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "no CUDA device: run with CPU=1 for the dry run"
        return 2
    fi

    if [[ "$DRY" == "1" ]]; then
        BENCH=(--quick --layers 1 --d 64 --repeats 2 --compile-mode eager)
        PROFILE=(--layers 1 --d 64 --repeats 2 --calls 1 --compile-mode eager)
        AUTOTUNE_MODE=eager
        TRAIN=(--tiny --steps 6)
        T_TESTS=120 T_BENCH=120 T_PROFILE=120 T_AUTOTUNE=120
    else
        BENCH=(--quick --repeats 20)
        PROFILE=(--calls 3 --repeats 20)
        AUTOTUNE_MODE=max-autotune-no-cudagraphs
        TRAIN=()
        T_TESTS=100 T_BENCH=170 T_PROFILE=80 T_AUTOTUNE=150
    fi

    has_part tests && run_part tests "$T_TESTS" "$PY" -m pytest -q -k cuda -p no:cacheprovider tests
    has_part bench && run_part bench "$T_BENCH" "$PY" benchmarks/bench_dualize.py "${BENCH[@]}" \
        --json "$RAW/bench.json" --plot "$RAW/bench_accuracy_time.png"
    has_part profile && run_part profile "$T_PROFILE" "$PY" benchmarks/profile_map.py "${PROFILE[@]}" --out "$RAW/profile"
    has_part autotune && run_part autotune "$T_AUTOTUNE" "$PY" benchmarks/profile_map.py "${PROFILE[@]}" --what map \
        --compile-mode "$AUTOTUNE_MODE" --out "$RAW/autotune"
    if has_part train; then
        # every run gets the same share of the time left, less set-up: imports and the corpus
        # (25 s once), and per run the model, normgraph's analysis and torch.compile of its map
        # in the warm-up, evaluation and the step() timing (40 s a run, with room to spare)
        read -r -a RUNS <<<"${TRAIN_RUNS:-normgraph:default muon:default adamw:default}"
        local left=$((DEADLINE - $(date +%s) - 5))
        local per=$(((left - 25 - 40 * ${#RUNS[@]}) / ${#RUNS[@]}))
        ((per > 150)) && per=150
        ((per < 10)) && per=10
        if [[ "$DRY" == "1" ]]; then per=60; fi
        run_part train "$left" "$PY" benchmarks/gpu_train_compare.py "${TRAIN[@]}" --out "$RAW/train" \
            --runs "${RUNS[@]}" --batch "${TRAIN_BATCH:-32}" --schedule time --time-budget "$per" \
            $([[ "$DRY" == "1" ]] || echo "--steps 1000000 --progress 250")
    fi

    echo "# parts (name, exit status, seconds):"
    sed 's/^/#   /' "$RAW/summary.txt"
    echo "# total $(($(date +%s) - START))s of ${TOTAL}s; $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    pack
    ! grep -qv ' rc=0 ' "$RAW/summary.txt"
}

main 2>&1 | tee "$OUTDIR/gpu_check.log"
status=${PIPESTATUS[0]}
cp "$OUTDIR/gpu_check.log" "$RAW/gpu_check.log" 2>/dev/null
exit "$status"
