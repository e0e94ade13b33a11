# Sourced first by a dev/gpu_*.sh device command: $OUT (default ./out) made, everything the command
# prints from here on also appended to $OUT/log.txt (so it comes back after a failure or a cut
# call too), `stamp MESSAGE` (MESSAGE after the seconds the command has run), the machine set up
# (dev/device_env.sh: PY, the venv, carried wheels and caches) and the GPU named.
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
stamp() { echo "== ${SECONDS}s: $*"; }
stamp "set-up"
source dev/device_env.sh
nvidia-smi --query-gpu=name,uuid,clocks.sm,clocks.mem,power.draw --format=csv 2>/dev/null
