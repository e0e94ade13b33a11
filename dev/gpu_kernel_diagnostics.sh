#!/usr/bin/env bash
# The kernel questions of the Triton and TileLang issues in one device command (<= 9.5 minutes):
#   OUT=/some/dir bash dev/gpu_kernel_diagnostics.sh     (carry .tilelang-site.tar.xz)
# 1. dev/tune_post.py: the post forward variants (loop=1, persistent, num_stages) against the
#    default, checked against the reference first (target: 90% of the copy rate);
# 2. dev/tune_hc_pre.py: the HC forward and backward configurations (tensor cores);
# 3. kernels.yaml --traffic, mHC and HC site fwd+bwd at C = 4096, triton and tilelang: per-kernel
#    DRAM bytes and times of the backward (bytes_measured.per_kernel), what limits fwd+bwd;
# 4. tests/test_dist_standin.py on the GPU (the residual variant's fix).
# Each step has its own time limit; $OUT gets tune_post.log, tune_hc_pre.log, per_kernel.txt,
# records.jsonl (step 3), standin.log and log.txt (everything), also after a failure.
set -u
source dev/device_call.sh
RUNS=$(mktemp -d /tmp/hcbench-diag.XXXX)
collect() {
    run=$(ls -d "$RUNS"/2*/ 2>/dev/null | head -1)
    [ -n "$run" ] && cp "$run/records.jsonl" "$OUT/" 2>/dev/null
    stamp "done: $(ls "$OUT" | tr '\n' ' ')"
}
trap collect EXIT

stamp "tune_post.py"
timeout -k 5 200 $PY dev/tune_post.py >"$OUT/tune_post.log" 2>&1
echo "exit $?"; tail -45 "$OUT/tune_post.log"

stamp "tune_hc_pre.py (forward configurations)"
timeout -k 5 100 $PY dev/tune_hc_pre.py --bwd "" >"$OUT/tune_hc_pre.log" 2>&1
echo "exit $?"; tail -30 "$OUT/tune_hc_pre.log"

stamp "site fwd+bwd under ncu (C = 4096)"
timeout -k 10 170 $PY harness.py run scenarios/kernels.yaml --traffic --out "$RUNS" \
    --only op=site --only mode=fwd+bwd --only method=mhc,hc --only backend=triton,tilelang --only C=4096 \
    >/dev/null 2>&1
echo "exit $?"
run=$(ls -d "$RUNS"/2*/ 2>/dev/null | head -1)
if [ -n "$run" ]; then
    $PY - "$run/records.jsonl" <<'PYEOF' | tee "$OUT/per_kernel.txt"
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    c, m = r["case"], r.get("bytes_measured") or {}
    print(f"{c['method']} {c['backend']} {c['mode']} C={c['C']}: {r['status']}, "
          f"{(r.get('time_ms') or {}).get('median')} ms, {r.get('traffic_reason', '')}")
    for k in m.get("per_kernel", []):
        gbps = (k["read"] + k["write"]) / k["time_ns"] if k.get("time_ns") else 0
        print(f"   {k['time_ns'] / 1e3:8.1f} us  {k['read'] / 1e6:8.1f} MB r  {k['write'] / 1e6:8.1f} MB w"
              f"  {gbps:6.0f} GB/s  {k['name'][:70]}")
PYEOF
fi

stamp "stand-in stream-safety test"
timeout -k 5 60 $PY -m pytest -q -rf --tb=short -p no:cacheprovider tests/test_dist_standin.py \
    >"$OUT/standin.log" 2>&1
echo "exit $?"; tail -5 "$OUT/standin.log"
