#!/usr/bin/env bash
# All GPU work of the many-GPUs issue on ONE GPU, within about 6 minutes: the single-GPU
# stand-ins of scenarios/pipeline.yaml (gpus: 1), where host-device copies on a copy engine
# stand in for the link between stages. Cases with gpus > 1 need torchrun on a multi-GPU node
# (make bench GPUS=8) and are not run here.
#   0. tests/test_dist_standin.py on the GPU: with real CUDA streams (copy stream, high-priority
#      post stream, early recompute) a stand-in stage's gradients and sent tensors equal those of
#      the plain inline schedule (a missing stream wait would show here);
#   1. p2p stand-in: a [T, n, C] message over the copy engine, n = 1, 2, 4, 8, C = 2560, 7168;
#   2. pipeline stand-in at C = 2560 (4 layers), then C = 7168 (2 layers), resumed into the same
#      run folder: residual, hc, mhc across the overlap techniques, step / compute / comm timed
#      in the same run, gated against the fp64 model first.
# Every step has its own time limit; whatever finished is reported and copied to $OUT, even
# after a failure. Files in $OUT (4): log.txt, pipeline.md, records.jsonl, run.tar.gz.
#
#   OUT=/some/dir bash dev/gpu_distributed.sh
set -u
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
RUNS=$(mktemp -d /tmp/hcbench-dist.XXXX)
PY=.venv/bin/python
SCEN=scenarios/pipeline.yaml
T0=$(date +%s)
stamp() { echo "== $(( $(date +%s) - T0 )) s: $*"; }
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

collect() {
    stamp "collecting"
    run=$(ls -d "$RUNS"/2*/ 2>/dev/null | head -1)
    if [ -n "$run" ]; then
        timeout -k 5 60 $PY harness.py report "$run" >/dev/null 2>&1
        cp "$run/report.md" "$OUT/pipeline.md" 2>/dev/null || echo "no report"
        cp "$run/records.jsonl" "$OUT/records.jsonl" 2>/dev/null
        find "$RUNS" -name history.sqlite -delete 2>/dev/null
        tar czf "$OUT/run.tar.gz" -C "$RUNS" . 2>/dev/null
    fi
    stamp "done"
}
trap collect EXIT

stamp "make env"
source dev/device_env.sh
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,power.draw,pcie.link.gen.current,pcie.link.width.current --format=csv

stamp "stand-in stream-safety test"
timeout -k 5 45 $PY -m pytest -q -rf --tb=short -p no:cacheprovider tests/test_dist_standin.py 2>&1 | tail -40

stamp "p2p stand-in"
timeout -k 10 45 $PY harness.py run $SCEN --out "$RUNS" --only gpus=1 --only parallel=p2p
echo "exit $?"
RUN=$(ls -d "$RUNS"/2*/ 2>/dev/null | head -1)
if [ -z "$RUN" ]; then echo "no run folder"; exit 1; fi

stamp "pipeline stand-in C=2560"
timeout -k 10 130 $PY harness.py run $SCEN --resume "$RUN" --only gpus=1 --only parallel=pipeline \
    --only C=2560
echo "exit $?"

stamp "pipeline stand-in C=7168"
timeout -k 10 100 $PY harness.py run $SCEN --resume "$RUN" --only gpus=1 --only parallel=pipeline \
    --only C=7168
echo "exit $?"

timeout -k 5 60 $PY harness.py report "$RUN" >/dev/null 2>&1
sed -n '/## Many GPUs/,/## Skipped/p' "$RUN/report.md" | head -60
