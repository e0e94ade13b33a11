#!/usr/bin/env bash
# All GPU work of the TileLang backend in one command (<= 8 minutes) on an offline GPU machine:
#   bash dev/gpu_tilelang.sh      (carrying .tilelang-site.tar.xz from tools/pack_tilelang_site.sh)
# The archive holds tilelang, apache-tvm-ffi, z3-solver, torch-c-dlpack-ext and tilelang's small
# pure deps, unpacked into /tmp/site and put on PYTHONPATH. Where tilelang is already importable
# the archive is not needed.
# Runs: precompile (post, residual, mHC and HC coefficient kernels), tests/tilelang, then
# kernels.yaml --only backend=tilelang,triton --only method=mhc,hc.
# Writes to $OUT: gpu_tilelang.log (everything), pytest.log, precompile.log, site_tests.log, run.tar.gz
# (the harness run folder) and summary.txt (the short table, also printed last).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
LOG="$OUT/gpu_tilelang.log"
exec > >(tee -a "$LOG") 2>&1
t_start=$(date +%s)
step() { echo; echo "=== $(date -u +%H:%M:%S) (+$(( $(date +%s) - t_start ))s) $*"; }
finish() {
  step "collecting results"
  run_dir=$(ls -d "$OUT"/runs/*/ 2>/dev/null | head -1)
  if [ -n "$run_dir" ]; then
    tar -czf "$OUT/run.tar.gz" -C "$OUT/runs" . && rm -rf "$OUT/runs"
  fi
  ls -la "$OUT"
}
trap finish EXIT

step "set-up (dev/device_env.sh: tilelang site, make env)"
MAKE_ENV_LOG=$OUT/make_env.log source dev/device_env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,clocks_throttle_reasons.active,temperature.gpu,power.draw --format=csv || true
$PY -c "import torch, tilelang, triton; print('torch', torch.__version__, 'tilelang', tilelang.__version__, 'triton', triton.__version__)"
$PY -c "import kernels; print('tilelang unavailable_reason:', kernels.unavailable_reason('mhc', 'tilelang', 'cuda'))"

step "precompile (parallel, into TileLang's disk cache)"
timeout -k 10 150 $PY dev/tilelang_precompile.py --procs 15 >"$OUT/precompile.log" 2>&1
echo "precompile rc=$? ($(grep -c '^ok' "$OUT/precompile.log") ok, $(grep -c '^FAILED' "$OUT/precompile.log") failed)"
grep -A4 '^FAILED' "$OUT/precompile.log" | head -30
tail -1 "$OUT/precompile.log"

step "GPU tests (tests/tilelang)"
timeout -k 10 100 $PY -m pytest -q -rA -p no:cacheprovider tests/tilelang >"$OUT/pytest.log" 2>&1
echo "pytest rc=$?"
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20
tail -3 "$OUT/pytest.log"

step "Triton site-link GPU tests (fwd+bwd against fp64; the TileLang ones are in tests/tilelang)"
timeout -k 10 60 $PY -m pytest -q -rf -p no:cacheprovider tests/triton/test_site.py -m gpu \
  >"$OUT/site_tests.log" 2>&1
echo "site tests rc=$?"
tail -3 "$OUT/site_tests.log"

step "kernels.yaml: tilelang and triton, mHC and HC (site and post)"
mkdir -p "$OUT/runs"
# one run: mHC site + post and HC site; if it runs out of time the records so far stay (writes
# are atomic) and the summary shows them
timeout -k 10 170 $PY harness.py run scenarios/kernels.yaml --out "$OUT/runs" \
  --only backend=tilelang,triton --only method=mhc,hc --set rep_ms=40 --set warmup_ms=10
echo "harness rc=$?"

step "summary"
run_dir=$(ls -d "$OUT"/runs/*/ 2>/dev/null | head -1)
if [ -n "$run_dir" ]; then
  $PY - "$run_dir" <<'PYEOF' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path
recs = [json.loads(l) for l in Path(sys.argv[1], "records.jsonl").read_text().splitlines() if l.strip()]
rows = {}
for r in recs:
    c = r["case"]
    key = (c["method"], c["op"], c["mode"], c["C"])
    t = (r.get("time_ms") or {}).get("median")
    rows.setdefault(key, {})[c["backend"]] = (r["status"], t, r.get("pct_of_copy"), r.get("reason", ""))
print(f"{'method':8} {'op':5} {'mode':8} {'C':>5} | {'triton ms':>9} {'%copy':>6} | {'tilelang ms':>11} {'%copy':>6} | tl/triton")
for key in sorted(rows):
    d = rows[key]
    def cell(b):
        s = d.get(b)
        if not s: return "-", "-"
        if s[0] != "ok": return s[0], ""
        return f"{s[1]:.3f}", f"{s[2]:.0f}" if s[2] is not None else "?"
    tr, tl = d.get("triton"), d.get("tilelang")
    ratio = f"{tl[1] / tr[1]:.2f}" if tr and tl and tr[0] == tl[0] == "ok" else ""
    print(f"{key[0]:8} {key[1]:5} {key[2]:8} {key[3]:>5} | {cell('triton')[0]:>9} {cell('triton')[1]:>6} | "
          f"{cell('tilelang')[0]:>11} {cell('tilelang')[1]:>6} | {ratio}")
for key in sorted(rows):
    for b, s in rows[key].items():
        if s[0] != "ok":
            print(f"{b} {key}: {s[0]}: {s[3][:160]}")
PYEOF
fi
echo "total $(( $(date +%s) - t_start ))s"
