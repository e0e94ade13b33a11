#!/usr/bin/env bash
# scenarios/kernels.yaml with every backend (torch, compile, triton, tilelang, liger) in one run
# folder, on an offline GPU machine, in one command of at most BUDGET_S (default 560 s):
#   OUT=/some/dir bash scripts/gpu_kernels.sh [harness args, e.g. --only C=4096]
# carrying .tilelang-site.tar.xz and .whl (liger-kernel). Set-up: scripts/device_env.sh. Then
# every case's compile caches are filled in parallel first (python -m suite.prewarm: TileLang's
# kernels, torch.compile's graphs and Liger's autotuning, which alone takes minutes per width),
# and the timed run starts with them full. The run folder goes to $OUT as run.tar.gz (records,
# env, report, scenarios), also when the time limit cuts it short; what is missing is finished
# with scripts/gpu_resume.sh on the same folder (a machine still warm keeps the caches).
set -u
OUT=${OUT:-$PWD/out}
BUDGET_S=${BUDGET_S:-560}
SCENARIO=scenarios/kernels.yaml
mkdir -p "$OUT/runs"
exec > >(tee -a "$OUT/log.txt") 2>&1
stamp() { echo "== ${SECONDS}s: $*"; }
collect() {
    stamp "collecting"
    run=$(ls -d "$OUT"/runs/*/ 2>/dev/null | head -1)
    if [ -n "$run" ]; then
        timeout -k 5 60 "${PY:-python3}" harness.py report "$run" >/dev/null 2>&1
        tail -60 "$run/report.md" 2>/dev/null
        tar -czf "$OUT/run.tar.gz" -C "$OUT/runs" . && rm -rf "$OUT/runs"
    fi
    stamp "done: $(ls "$OUT" | tr '\n' ' ')"
}
trap collect EXIT

stamp "set-up"
source scripts/device_env.sh
nvidia-smi --query-gpu=name,uuid,clocks.sm,clocks.mem,power.draw --format=csv 2>/dev/null

prewarm_args=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --only|--set) prewarm_args+=("${args[i]}" "${args[i+1]}"); i=$((i + 1)) ;;
    esac
done
left=$((BUDGET_S - SECONDS))
stamp "prewarm (limit $((left / 2))s)"
timeout -k 5 $((left / 2)) "$PY" -m suite.prewarm "$SCENARIO" "${prewarm_args[@]}" --jobs 14 \
    2>&1 | tail -25

left=$((BUDGET_S - SECONDS))
stamp "run (limit ${left}s)"
timeout -k 10 "$left" "$PY" harness.py run "$SCENARIO" --out "$OUT/runs" "$@" 2>&1 | tail -30
stamp "harness exit status ${PIPESTATUS[0]} (124 = cut at the time limit; finished cases are kept)"
