#!/usr/bin/env bash
# What limits the fused boundary (kernels/*/post_coeffs.py) on a GPU, in one device command
# (<= 9.5 minutes):   OUT=/some/dir bash dev/gpu_chain_diagnostics.sh   (carry .tilelang-site.tar.xz)
# 1. Nsight Compute over one fused site forward+backward at C = 4096 (dev/tune_chain.py
#    --profile-once): per kernel its time, DRAM throughput, occupancy, registers and stall reasons;
# 2. dev/tune_chain.py --kernels, Triton: the launch configurations FWD_CFGS / BWD_CFGS (the
#    forward ones chosen by their sm_90 registers: <= 128 lets two 8-warp programs share an SM) against the
#    default and the unfused chain, each timing's kernels;
# 3. the same for TileLang (TL_FWD_CFGS / TL_BWD_CFGS).
# Each step has its own time limit; $OUT gets ncu.txt, tune_triton.log, tune_tilelang.log and
# log.txt (everything), also after a failure. Reads GPU state only (ncu --clock-control none).
set -u
FWD_CFGS=${FWD_CFGS:-";reduction=atomic;bt=128,bc=16;bt=64,bc=16;bt=64,bc=32;bt=16,warps=4;bt=16,bc=32,warps=4;bt=64,bc=16,warps=4;unroll=1,bt=64,bc=16;unroll=1,bt=32,bc=16,warps=4;bt=64;warps=4;cw=1024;cw=256"}
BWD_CFGS=${BWD_CFGS:-";reduction=atomic;b2_br=32;b2_br=32,b2_bt=32;b2_br=32,b2_bt=64;b2_br=16,b2_warps=4;b1_bt=8"}
TL_FWD_CFGS=${TL_FWD_CFGS:-""}
TL_BWD_CFGS=${TL_BWD_CFGS:-""}
source dev/device_call.sh
NCU=${HCBENCH_NCU:-/usr/local/cuda/bin/ncu}

stamp "Nsight Compute: one fused site fwd+bwd, C = 4096"
timeout -k 5 ${NCU_S:-120} "$NCU" --clock-control none --profile-from-start off --target-processes all \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
    --section WarpStateStats --section SchedulerStats \
    "$PY" dev/tune_chain.py --C 4096 --profile-once >"$OUT/ncu.txt" 2>&1
echo "exit $?"
grep -E "^  [a-z_]+.*\(|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Block Size|Grid Size|Waves Per SM|Stall|Compute \(SM\) Throughput" \
    "$OUT/ncu.txt" | head -120

stamp "tune_chain.py Triton"
timeout -k 5 ${TUNE_S:-250} "$PY" dev/tune_chain.py --C 4096 --kernels --budget $(( ${TUNE_S:-250} - 30 )) \
    --fwd "$FWD_CFGS" --bwd "$BWD_CFGS" >"$OUT/tune_triton.log" 2>&1
echo "exit $?"; tail -25 "$OUT/tune_triton.log"

stamp "tune_chain.py TileLang"
timeout -k 5 ${TL_TUNE_S:-110} "$PY" dev/tune_chain.py --C 4096 --kernels --backend tilelang \
    --budget $(( ${TL_TUNE_S:-110} - 40 )) --fwd "$TL_FWD_CFGS" --bwd "$TL_BWD_CFGS" >"$OUT/tune_tilelang.log" 2>&1
echo "exit $?"; tail -16 "$OUT/tune_tilelang.log"
stamp "done: $(ls "$OUT" | tr '\n' ' ')"
