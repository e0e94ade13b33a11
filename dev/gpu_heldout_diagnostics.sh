#!/usr/bin/env bash
# How far the Triton kernels stay from their floors away from n = 4, and which launch sizes bring
# them closer, in one device command (<= 9.5 minutes):   OUT=/some/dir bash dev/gpu_heldout_diagnostics.sh
# At T = 16384, bf16, each step checked against the fp64 reference before it is timed; C = 6144 (a
# width of scenarios/held_out.yaml) for the site's kernels, 4096 (scenarios/chain.yaml's) for the chain:
# 1. mhc_pre's forward and the site forward (dev/tune_mhc_pre.py) at n = 8 and 6: the default
#    (mhc_pre.WIDE, 32 x 32 at 4 warps, chosen from the sm_90 compile: 3-4 programs an SM) against
#    64 x 32 at 8 and at 4 warps and the n <= 4 default (64 x 64, 4 warps);
# 2. F_post,res (dev/tune_post.py) at n = 6: the loop kernel's variants;
# 3. the fused boundary's chain (dev/tune_chain.py --kernels) at n = 8 and 6: the default bc
#    (post_coeffs.default_bc) against 32-column chunks and smaller token blocks.
# dev/sm90_occupancy.py prints the registers and programs an SM of every forward configuration
# here without a GPU. $OUT gets one log per step and log.txt (everything), also after a failure.
set -u
C=${C:-6144}
CHAIN_C=${CHAIN_C:-4096}
PRE_CFGS=${PRE_CFGS:-";bt=64,bk=32,warps=8;bt=64,bk=32,warps=4;bt=64,bk=64,warps=4"}
POST_CFGS=${POST_CFGS:-";loop=0|;loop=1,num_stages=1|;loop=1,num_stages=2|;loop=1,block_c=256|"}
CHAIN_CFGS=${CHAIN_CFGS:-";bc=32;bt=16,bc=32,warps=4;bt=64,bc=16"}
source dev/device_call.sh

for n in 8 6; do
    stamp "tune_mhc_pre.py n = $n, C = $C"
    TUNE_BUDGET_S=${PRE_S:-75} timeout -k 5 $(( ${PRE_S:-75} + 30 )) \
        "$PY" dev/tune_mhc_pre.py --n "$n" --C "$C" --fwd "$PRE_CFGS" >"$OUT/tune_mhc_pre_n$n.log" 2>&1
    echo "exit $?"; tail -12 "$OUT/tune_mhc_pre_n$n.log"
done

stamp "tune_post.py n = 6, C = $C"
timeout -k 5 ${POST_S:-70} "$PY" dev/tune_post.py --n 6 --C "$C" --configs "$POST_CFGS" \
    >"$OUT/tune_post_n6.log" 2>&1
echo "exit $?"; tail -10 "$OUT/tune_post_n6.log"

for n in 8 6; do
    stamp "tune_chain.py n = $n, C = $CHAIN_C"
    timeout -k 5 ${CHAIN_S:-100} "$PY" dev/tune_chain.py --n "$n" --C "$CHAIN_C" --kernels \
        --budget $(( ${CHAIN_S:-100} - 25 )) --fwd "$CHAIN_CFGS" --bwd "" >"$OUT/tune_chain_n$n.log" 2>&1
    echo "exit $?"; tail -14 "$OUT/tune_chain_n$n.log"
done
stamp "done: $(ls "$OUT" | tr '\n' ' ')"
