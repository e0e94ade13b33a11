#!/usr/bin/env bash
# The GPU work of the overhead verdict in one command, on an offline GPU machine:
#   OUT=/some/dir [BUDGET_S=560] [WIDTHS="1280 2560 1920"] [GRAPHS=1] [GPU_TESTS=0] [SMOKE=1] \
#       [PRECOMPILE="1280"] (TileLang widths, default WIDTHS) \
#       bash dev/gpu_overhead.sh
# 1. set-up (dev/device_env.sh: make env on the machine's torch, TileLang from a carried
#    .tilelang-site.tar.xz, wheels from .whl/);
# 2. the GPU tests of the timer, the deepseek layers and the recompute;
# 3. TileLang's kernels at the scenario's widths and its gate's width (backend auto times them);
# 4. scenarios/overhead.yaml, one width at a time into one run folder (--resume), in WIDTHS
#    order, while BUDGET_S lasts (GRAPHS=1 then adds the 3B CUDA-graph cases when they were not in
#    WIDTHS); SMOKE=1 runs the 3B width with accum 2 instead (a check that everything runs, not a
#    result);
# 5. the deepseek block cross-check against torchtitan's, when its wheel was carried.
# Whatever finished is copied to $OUT, also after a failure or the time limit: log.txt,
# gpu_tests.log, precompile.log, crosscheck.txt, records.jsonl, env.json, report.md.
set -u
OUT=${OUT:-$PWD/out}
BUDGET_S=${BUDGET_S:-560}
WIDTHS=${WIDTHS-"1280 2560 1920"}     # set but empty: no width (GRAPHS=1 alone)
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
RUNS=$(mktemp -d /tmp/hcbench-runs.XXXX)
stamp() { echo "== ${SECONDS}s: $*"; }
left() { echo $((BUDGET_S - SECONDS)); }
collect() {
    stamp "collecting"
    run=$(ls -d "$RUNS"/2*/ 2>/dev/null | head -1)
    if [ -n "$run" ]; then
        timeout -k 5 60 "${PY:-python3}" harness.py report "$run" >/dev/null 2>&1
        for f in records.jsonl env.json report.md; do cp "$run/$f" "$OUT/" 2>/dev/null; done
    fi
    stamp "done: $(ls "$OUT" | tr '\n' ' ')"
}
trap collect EXIT

stamp "set-up"
MAKE_ENV_LOG=$OUT/make_env.log source dev/device_env.sh
nvidia-smi --query-gpu=name,uuid,clocks.sm,clocks.mem,power.draw --format=csv 2>/dev/null
$PY -c "import torch, kernels; print('torch', torch.__version__, 'grouped_mm', hasattr(torch, '_grouped_mm')); print('auto candidates:', kernels.candidates('mhc', 'cuda'))"

if [ "${GPU_TESTS:-1}" = 1 ]; then
    stamp "GPU tests"
    timeout -k 5 120 $PY -m pytest -q -rfE -p no:cacheprovider tests/test_timing_wall.py \
        tests/test_deepseek.py tests/test_recompute.py >"$OUT/gpu_tests.log" 2>&1
    echo "gpu tests rc=$?"; tail -3 "$OUT/gpu_tests.log"
fi

if $PY -c "import tilelang" 2>/dev/null; then
    stamp "TileLang kernels at the model widths and the gate's"
    shapes=(--shape 4:480:64)
    for C in ${PRECOMPILE:-$WIDTHS}; do shapes+=(--shape "4:$C:4096"); done
    timeout -k 5 180 $PY dev/tilelang_precompile.py --procs 15 "${shapes[@]}" \
        >"$OUT/precompile.log" 2>&1
    echo "precompile rc=$?"; tail -1 "$OUT/precompile.log"
fi

first=1
for C in $WIDTHS; do
    budget=$(left)
    [ "$budget" -gt 60 ] || { stamp "no time left for C=$C"; break; }
    extra=()
    [ "${SMOKE:-0}" = 1 ] && extra=(--set accum=2)
    if [ $first = 1 ]; then
        stamp "overhead C=$C (limit ${budget}s)"
        timeout -k 10 "$budget" $PY harness.py run scenarios/overhead.yaml --out "$RUNS" \
            --only C=$C "${extra[@]}"
        first=0
    else
        run=$(ls -d "$RUNS"/2*/ | head -1)
        stamp "overhead C=$C, resumed (limit ${budget}s)"
        timeout -k 10 "$budget" $PY harness.py run scenarios/overhead.yaml --resume "$run" \
            --only C=$C
    fi
    echo "exit $?"
    [ "${SMOKE:-0}" = 1 ] && break
done

if [ "${GRAPHS:-0}" = 1 ] && [ "$(left)" -gt 120 ]; then
    run=$(ls -d "$RUNS"/2*/ 2>/dev/null | head -1)
    budget=$(left)
    stamp "overhead, 3B CUDA-graph cases (limit ${budget}s)"
    if [ -n "$run" ]; then
        timeout -k 10 "$budget" $PY harness.py run scenarios/overhead.yaml --resume "$run" \
            --only C=1280 --only cuda_graph=True
    else
        timeout -k 10 "$budget" $PY harness.py run scenarios/overhead.yaml --out "$RUNS" \
            --only C=1280 --only cuda_graph=True
    fi
    echo "exit $?"
fi

if [ -f dev/crosscheck_deepseek_block.py ] && [ "$(left)" -gt 40 ]; then
    stamp "cross-check against torchtitan's block"
    timeout -k 5 $(( $(left) - 10 )) $PY dev/crosscheck_deepseek_block.py \
        >"$OUT/crosscheck.txt" 2>&1
    echo "crosscheck rc=$?"; tail -5 "$OUT/crosscheck.txt"
fi
