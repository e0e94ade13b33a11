#!/usr/bin/env bash
# All GPU work of the whole-step overhead issue in one command, within about 8 minutes:
#   1. scenarios/overhead.yaml at C = 2560 and 7168 first, then the other widths in what is left
#      (each width's residual, hc and mhc cases timed interleaved; gate against the fp64 model);
#   2. scenarios/recompute.yaml trimmed to L = 12 (the L_r sweep, none and full);
#   3. scripts/stability.py: Amax Gain Magnitude fresh and after 200 synthetic training steps.
# Every step has its own time limit; whatever finished is reported and copied to $OUT, even
# after a failure. Files in $OUT (6): log.txt, overhead.md, recompute.md, stability.md,
# stability.png (when matplotlib is there), runs.tar.gz (the run folders and stability.json).
#
#   OUT=/some/dir bash scripts/gpu_overhead.sh
set -u
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
RUNS=$(mktemp -d /tmp/hcbench-runs.XXXX)
PY=.venv/bin/python
T0=$(date +%s)
stamp() { echo "== $(( $(date +%s) - T0 )) s: $*"; }

collect() {
    stamp "collecting"
    for name in overhead recompute; do
        run=$(ls -d "$RUNS/$name"/2*/ 2>/dev/null | head -1)
        if [ -n "$run" ]; then
            timeout -k 5 60 $PY harness.py report "$run" >/dev/null 2>&1
            cp "$run/report.md" "$OUT/$name.md" 2>/dev/null || echo "no report for $name"
        fi
    done
    cp "$RUNS/stability/stability.md" "$OUT/stability.md" 2>/dev/null
    cp "$RUNS/stability/stability.png" "$OUT/stability.png" 2>/dev/null
    find "$RUNS" -name history.sqlite -delete 2>/dev/null
    tar czf "$OUT/runs.tar.gz" -C "$RUNS" . 2>/dev/null
    stamp "done"
}
trap collect EXIT

stamp "make env"
source scripts/device_env.sh
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,power.draw --format=csv

stamp "overhead C=2560,7168"
timeout -k 10 160 $PY harness.py run scenarios/overhead.yaml --out "$RUNS/overhead" \
    --only C=2560,7168
echo "exit $?"
RUN=$(ls -d "$RUNS/overhead"/2*/ 2>/dev/null | head -1)
if [ -n "$RUN" ]; then
    stamp "overhead C=1280,1920,4096 (same run folder, resumed)"
    timeout -k 10 100 $PY harness.py run scenarios/overhead.yaml --resume "$RUN" \
        --only C=1280,1920,4096
    echo "exit $?"
fi

stamp "recompute L=12"
timeout -k 10 100 $PY harness.py run scenarios/recompute.yaml --out "$RUNS/recompute" \
    --only layers=12
echo "exit $?"

stamp "stability"
timeout -k 10 70 $PY scripts/stability.py --out "$RUNS/stability" --steps 200
echo "exit $?"

for name in overhead recompute; do
    run=$(ls -d "$RUNS/$name"/2*/ 2>/dev/null | head -1)
    [ -n "$run" ] && timeout -k 5 60 $PY harness.py report "$run" >/dev/null 2>&1
    [ -n "$run" ] && sed -n '/## Overhead verdict/,/## Skipped/p; /## Recompute/,$p' "$run/report.md" 2>/dev/null | head -80
done
