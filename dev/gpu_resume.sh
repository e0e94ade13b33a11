#!/usr/bin/env bash
# Finishes a committed run folder on a fresh, offline GPU machine in one command:
#   OUT=/some/dir bash dev/gpu_resume.sh SCENARIO RUN_DIR [--only K=V ...] [--set K=V ...] [--traffic]
# RUN_DIR "new" starts a fresh run folder under $OUT/runs instead (dev/gpu_kernels.sh).
# e.g. the cases a time-limited call left out:
#   bash dev/gpu_resume.sh scenarios/recompute.yaml results/<run> --only layers=30
#   bash dev/gpu_resume.sh scenarios/traffic.yaml results/<run> --only backend=compile,liger
# Set-up: dev/device_env.sh (TileLang from .tilelang-site.tar.xz, `make env` on the machine's
# torch, the wheels under .whl/ such as liger-kernel). Then the scenario's remaining cases are
# compiled in parallel (harness.py prewarm: Liger's compiles, torch.compile, TileLang) and run
# with --resume. Whatever finished is copied to $OUT (records.jsonl, env.json, report.md,
# scenarios/, log.txt), also when the time limit (BUDGET_S, default 560 s; the prewarm gets
# PREWARM_S of it, default a third; 0 skips it) cuts the run short;
# each device call starts from the committed folder, so merge the records afterwards
# (`python harness.py merge`).
# Shapes whose compiles alone outlast one call (Liger's mHC at C = 7168): a prewarm-only call packs
# Triton's cache into $OUT and the next call carries it back (dev/device_env.sh says how).
set -u
[ $# -ge 2 ] || { echo "usage: bash dev/gpu_resume.sh SCENARIO RUN_DIR [harness args...]" >&2; exit 2; }
SCENARIO=$1 RUN_DIR=${2%/}
shift 2
OUT=${OUT:-$PWD/out}
BUDGET_S=${BUDGET_S:-560}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
stamp() { echo "== ${SECONDS}s: $*"; }
collect() {
    stamp "collecting"
    [ "$RUN_DIR" = new ] && RUN_DIR=$(ls -d "$OUT"/runs/*/ 2>/dev/null | head -1) && RUN_DIR=${RUN_DIR%/}
    [ -n "$RUN_DIR" ] || { stamp "no run folder"; return; }
    timeout -k 5 60 "${PY:-python3}" harness.py report "$RUN_DIR" >/dev/null 2>&1
    for f in records.jsonl env.json report.md scenarios; do
        [ -e "$RUN_DIR/$f" ] && cp -r "$RUN_DIR/$f" "$OUT/"
    done
    [ "$RUN_DIR" = "${RUN_DIR#"$OUT"/runs/}" ] || rm -rf "$OUT/runs"     # a new run: copied above
    stamp "done: $(ls "$OUT" | tr '\n' ' ')"
}
[ "$RUN_DIR" = new ] || [ -d "$RUN_DIR" ] || { echo "gpu_resume: $RUN_DIR is not a run folder" >&2; exit 2; }
[ -f "$SCENARIO" ] || { echo "gpu_resume: $SCENARIO: no such scenario file" >&2; exit 2; }
trap collect EXIT

stamp "set-up"
source dev/device_env.sh
nvidia-smi --query-gpu=name,uuid,clocks.sm,clocks.mem,power.draw --format=csv 2>/dev/null

# prewarm takes --only and --set; the harness flags it does not know stay for the run
prewarm_args=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --only|--set) prewarm_args+=("${args[i]}" "${args[i+1]}"); i=$((i + 1)) ;;
    esac
done
left=$((BUDGET_S - SECONDS))
PREWARM_S=${PREWARM_S:-$((left / 3))}
if [ "$PREWARM_S" -gt 0 ]; then     # timeout 0 would mean no limit at all
    stamp "prewarm (limit ${PREWARM_S}s)"
    timeout -k 5 "$PREWARM_S" "$PY" harness.py prewarm "$SCENARIO" "${prewarm_args[@]}" --jobs 12 \
        2>&1 | tail -20
else
    stamp "no prewarm (PREWARM_S=0): each case compiles in the timed process"
fi

left=$((BUDGET_S - SECONDS))
if [ "$RUN_DIR" = new ]; then
    mkdir -p "$OUT/runs"
    stamp "run into $OUT/runs (limit ${left}s)"
    timeout -k 10 "$left" "$PY" harness.py run "$SCENARIO" --out "$OUT/runs" "$@" 2>&1 | tail -40
else
    stamp "run --resume $RUN_DIR (limit ${left}s)"
    timeout -k 10 "$left" "$PY" harness.py run "$SCENARIO" --resume "$RUN_DIR" "$@" 2>&1 | tail -40
fi
stamp "harness exit status ${PIPESTATUS[0]} (124 = cut at the time limit; finished cases are kept)"
