#!/usr/bin/env bash
# scenarios/stability.yaml on one GPU in one device command (<= BUDGET_S, default 560 s):
#   OUT=/some/dir bash dev/gpu_stability.sh [harness args, e.g. --only lr=0.01]
# A stability case measures losses, gradient norms and composite gains, not times, and one case at
# C = 512 leaves most of an H100 idle, so its cases train side by side: one process slot per learning
# rate and method group (METHOD_GROUPS, default "hc+residual mhc": a slot runs hc, then residual; another
# mHC's two inits, the paper's first), each resuming its own copy of one run folder, folded back with
# `harness.py merge` at the end. A slot runs its most telling case first, so a call cut short keeps it. The records' step_ms are then wall
# clock per step under that sharing, not a speed. Set-up: dev/device_env.sh. Whatever finished goes
# to $OUT (records.jsonl, env.json, report.md, scenarios/, log.txt, one log per process), also when
# the time limit cuts the run short: resume the rest from the committed folder with
#   OUT=/some/dir bash dev/gpu_stability.sh --resume results/<run> [--only lr=...]
set -u
OUT=${OUT:-$PWD/out}
BUDGET_S=${BUDGET_S:-560}
LRS=${LRS:-"0.01 0.003 0.001"}
METHOD_GROUPS=${METHOD_GROUPS:-"hc+residual mhc"}
SCEN=scenarios/stability.yaml
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
stamp() { echo "== ${SECONDS}s: $*"; }
W=$(mktemp -d /tmp/hcbench-stability.XXXX)
RUN=
collect() {
    [ -n "$RUN" ] || { stamp "no run folder"; return; }
    copies=$(ls -d "$W"/copy-*/*/ 2>/dev/null)
    [ -n "$copies" ] && timeout -k 5 60 "$PY" harness.py merge "$RUN" $copies 2>&1 | tail -3
    timeout -k 5 60 "$PY" harness.py report "$RUN" >/dev/null 2>&1
    for f in records.jsonl env.json report.md scenarios; do
        [ -e "$RUN/$f" ] && cp -r "$RUN/$f" "$OUT/"
    done
    stamp "done: $(ls "$OUT" | tr '\n' ' ')"
}
trap collect EXIT

args=("$@")
resume=
for ((i = 0; i < ${#args[@]}; i++)); do
    [ "${args[i]}" = --resume ] && resume=${args[i+1]}
done
stamp "set-up"
source dev/device_env.sh
# six processes share the card's memory: less held back by fragmentation
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
nvidia-smi --query-gpu=name,uuid,clocks.sm,clocks.mem,power.draw --format=csv 2>/dev/null
if [ -n "$resume" ]; then
    [ -d "$resume" ] || { echo "gpu_stability: $resume is not a run folder" >&2; exit 2; }
    mkdir -p "$W/runs" && cp -r "${resume%/}" "$W/runs/" && RUN=$W/runs/$(basename "${resume%/}")
    rest=()
    for ((i = 0; i < ${#args[@]}; i++)); do
        [ "${args[i]}" = --resume ] && { i=$((i + 1)); continue; }
        rest+=("${args[i]}")
    done
    args=("${rest[@]+"${rest[@]}"}")
else
    # the run folder, with the CPU cases (seconds): every process then resumes a copy of it
    stamp "CPU cases: the run folder"
    "$PY" harness.py run "$SCEN" --out "$W/runs" --only device=cpu 2>&1 | tail -3
    RUN=$(ls -d "$W"/runs/*/ | head -1) && RUN=${RUN%/}
fi
end=$((BUDGET_S - 40))     # 40 s for merge, report and copies
k=0
pids=()
for lr in $LRS; do
    for g in $METHOD_GROUPS; do
        k=$((k + 1))
        mkdir -p "$W/copy-$k" && cp -r "$RUN" "$W/copy-$k/"
        stamp "slot $k: lr=$lr methods ${g//+/, then } (until ${end}s)"
        (
            for m in ${g//+/ }; do
                left=$((end - SECONDS))
                [ "$left" -gt 30 ] || { echo "== no time left for method=$m"; break; }
                timeout -k 10 "$left" "$PY" harness.py run "$SCEN" --resume "$W/copy-$k/$(basename "$RUN")" \
                    --only device=cuda --only lr="$lr" --only method="$m" "${args[@]+"${args[@]}"}"
            done
        ) >"$OUT/process-$k.log" 2>&1 &
        pids+=($!)
    done
done
wait "${pids[@]}"     # not a bare wait: it would also wait for the tee above
stamp "processes finished"
for f in "$OUT"/process-*.log; do echo "-- $f"; tail -8 "$f"; done
