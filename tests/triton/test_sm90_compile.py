"""Triton kernels compiled for an H100 (sm_90) without a GPU: the lowering the interpreter never
does (tensor-core instructions, ptxas) fails here rather than on the GPU machine. The compile runs
in a child process with TRITON_INTERPRET=0 (this process's kernels are interpreter objects).
Skipped where this triton cannot compile for CUDA (no bundled ptxas)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent

CHILD = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kernels.triton.hc_pre_fwd as H
n, bm, bk, warps = json.loads(sys.argv[1])
sig = {"x_ptr": "*bf16", "whi_ptr": "*bf16", "wlo_ptr": "*bf16", "b_ptr": "*fp32", "s_ptr": "*fp32",
       "hpre_ptr": "*fp32", "hpost_ptr": "*fp32", "hres_ptr": "*fp32", "z_ptr": "*fp32",
       "r_ptr": "*fp32", "R": "i32", "C": "i32", "EPS": "fp32",
       **{k: "constexpr" for k in ("N", "NK", "NKP", "BM", "BK", "STAGES", "SAVE", "DOT_F32")}}
const = {"N": n, "NK": n + 2, "NKP": 16, "BM": bm, "BK": bk, "STAGES": 3, "SAVE": True,
         "DOT_F32": False}
try:
    k = triton.compile(ASTSource(fn=H.fwd_gemm_kernel, signature=sig, constexprs=const),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 3})
except RuntimeError as exc:
    if "ptxas" in str(exc).lower():
        print(json.dumps({"skip": str(exc).splitlines()[0]}))
        sys.exit(0)
    raise
print(json.dumps({"wgmma": "wgmma.mma_async" in k.asm["ptx"], "cubin": len(k.asm["cubin"])}))
"""


@pytest.mark.parametrize("n,bm,bk,warps", [(4, 64, 64, 4), (8, 128, 128, 8), (3, 64, 64, 4)])
def test_hc_gemm_forward_uses_wgmma_on_sm90(n, bm, bk, warps):
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps([n, bm, bk, warps])], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    if "skip" in got:
        pytest.skip(f"triton cannot compile for sm_90 here: {got['skip']}")
    assert got["wgmma"]            # the projections run on Hopper tensor cores
    assert got["cubin"] > 0        # ptxas accepted the kernel


CHAIN_CHILD = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kernels.triton.post_coeffs_bwd as B
import kernels.triton.post_coeffs_fwd as F
from kernels.triton.common import coef_shapes
from kernels.triton.post_coeffs import _br, default_bc
from kernels.triton.post_coeffs_config import DEFAULT
n, dt = json.loads(sys.argv[1])
K, NP, KP = coef_shapes(n)
BR = _br(DEFAULT, NP, KP)
# pointers to tensors in the state dtype (the forward's phi comes as its hi / lo halves in it)
fwd_state = ("x_ptr", "f_ptr", "phi_ptr", "plo_ptr", "out_ptr")
bwd_state = ("gx_ptr", "x1_ptr", "x0_ptr", "f_ptr", "gli_ptr", "dx_ptr", "df_ptr")
kernels = [
    # the bf16 case lowers the atomic reduction and the unrolled destinations, the fp16 one the defaults
    (F.post_coeffs_fwd_kernel, fwd_state, dict(N=n, K=K, KP=KP, BT=32, BC=default_bc(n), STAGES=2,
                                    ATOMIC=dt == "bf16", UNROLL=dt == "bf16", DOT_F32=False)),
    (F.coeffs_finish_kernel, (), dict(N=n, NP=NP, K=K, BT=16, SAVE=True, EPS_RMS=1e-6, EPS_SK=1e-6)),
    (B.post_coeffs_bwd_kernel, bwd_state, dict(N=n, NP=NP, K=K, KP=KP, BT=16, BR=BR, STAGES=2, HAS_GX=True,
                                    HAS_LI=True, NEED_DX=True, NEED_DF=True, NEED_DH=True, DPHI=True,
                                    PREC="tf32", DPHI_BF16=dt == "bf16", ATOMIC=dt == "bf16",
                                    DOT_F32=False)),
]
out = {}
for fn, state, const in kernels:
    sig = {a: "constexpr" if a in const else (f"*{dt}" if a in state else "*fp32") if a.endswith("_ptr")
           else "i32" for a in fn.arg_names}
    # what the launcher's specialisation gives at the benchmark widths: 16-byte aligned tensors, C % 16 == 0
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if a.endswith("_ptr") or a == "C"}
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 2})
    except RuntimeError as exc:
        if "ptxas" in str(exc).lower():
            print(json.dumps({"skip": str(exc).splitlines()[0]}))
            sys.exit(0)
        raise
    out[fn.__name__] = len(k.asm["cubin"])
print(json.dumps(out))
"""


@pytest.mark.parametrize("n,dtype", [(4, "bf16"), (8, "fp16")])
def test_chain_boundary_kernels_compile_for_sm90(n, dtype):
    """The fused boundary's kernels (kernels/triton/post_coeffs_*.py) through the whole sm_90
    lowering: tensor-core products on computed tiles, the wide tile viewed as [BT, n, br]."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", CHAIN_CHILD, json.dumps([n, dtype])], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    if "skip" in got:
        pytest.skip(f"triton cannot compile for sm_90 here: {got['skip']}")
    assert set(got) == {"post_coeffs_fwd_kernel", "coeffs_finish_kernel", "post_coeffs_bwd_kernel"}
    assert all(size > 0 for size in got.values())


def test_wide_forward_defaults_fit_several_programs_an_sm():
    """At n = 5 and 8 the forwards' default sizes (mhc_pre.WIDE, post_coeffs.default_bc) were
    chosen for occupancy from the sm_90 compile: no spills, and at least 3 (mhc_pre) or 2
    (post_coeffs) programs an SM. dev/sm90_occupancy.py does the compile and the arithmetic."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "dev/sm90_occupancy.py", "--kernel", "mhc_pre,post_coeffs",
                          "--n", "5,8", "--json"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    if out.returncode == 3:
        pytest.skip(out.stderr.strip().splitlines()[-1])
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert {(r["kernel"], r["n"]) for r in rows} == {(k, n) for k in ("mhc_pre", "post_coeffs") for n in (5, 8)}
    for r in rows:
        assert "error" not in r, r
        assert r["spill_stores"] == 0 and r["local"] == 0, r
        assert r["ctas_per_sm"] >= (3 if r["kernel"] == "mhc_pre" else 2), r
