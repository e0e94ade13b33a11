"""HC pre (dynamic Hyper-Connections, MATH.md "HC"): per-stream RMSNorm, tanh projections and F_pre.

    hc_coeffs(x, w, b, s) -> (h_pre [T,n] fp32, h_post [T,n] fp32, h_res [T,n,n] fp32)
    hc_pre(x, w, b, s)    -> (layer_input [T,C] x.dtype, h_post, h_res)

x [T, n, C] bf16/fp16 (n <= 8, C % 8 == 0); w fp32 [C, n+2] = [w_pre | w_post | W_res] (RMSNorm weight
folded in); b fp32 [n*n+2n] = [b_pre | b_post | b_res (dst, src)]; s fp32 [2] = (s_a, s_b). Per token:
    r[i] = rsqrt(mean_c x[i]^2 + 1e-6),  z[i, k] = r[i] * (x[i] . w[:, k]),  p = tanh(z)
    h_pre[i] = s_a p[i,0] + b_pre[i];  h_post[i] = s_b p[i,1] + b_post[i]
    h_res[j,i] = s_a p[i,2+j] + b_res[j,i]       (source i's projection fills column i)
    layer_input = sum_i h_pre[i] x[i]
Both functions are differentiable w.r.t. x, w, b, s (torch.autograd.Function; only the gradients
asked for in ctx.needs_input_grad are computed).

Design (NK = n+2 projections, NP = n rounded up to a power of two). Times: H100 SXM, bf16,
n = 4, T = 16384 (dev/tune_hc_pre.py; kernel times from torch.profiler, L2 flushed).

Forward, fwd_impl="gemm" (the default; C = 4096: 0.45 ms against 1.02 ms for the FMA forward
below, C = 7168: 0.75 against 1.46 ms; gemm_bk = 128 and gemm_stages = 4 beat 64 / 3, 0.52 and
0.85 ms):
  _fwd_gemm_kernel, grid cdiv(T*n, gemm_bm): x viewed as [T*n, C] rows (token, stream); each
    program streams its rows' C in gemm_bk chunks (pipelined, gemm_stages), multiplies them on
    tensor cores by w [C, 16] split into hi + lo in x's dtype (two products, fp32 accumulation:
    w to ~16 bits, x as loaded), and sums squares; per row: r, z, tanh, h_pre, h_post and
    column i of h_res (z, r saved for the backward). 195 us at C = 4096 (2.75 TB/s of x).
  apply_pre (kernels/triton/apply_pre.py): layer_input from h_pre, reading x again (229 us).
  DRAM bytes per token: read 2nC (x twice), write C + small. On the interpreter the products run
  in fp32 (it multiplies 16-bit float tiles as bit patterns), so CPU tests check the indexing and
  the epilogue, and the GPU tests the bf16 products.

Forward, fwd_impl="fma" (selectable; one kernel, x read once from DRAM, but latency-bound at
16-27% of the copy rate on the H100):
  x is read as int32 pairs of bf16/fp16 (x.view(int32)): one shift or mask turns each half into
  fp32 (bf16), where a plain .to(float32) costs two instructions per element. Tiles are
  [BT tokens, NP streams, NTH = 32 * num_warps threads, CP pairs]: a thread owns 2*CP adjacent
  columns of all BT*NP rows, so w[c, k] (from a transposed, chunk-padded copy wT [NK, CW]) is loaded
  once per thread (16-byte, unmasked) and used BT*NP times; every accumulator has the tile's shape,
  so the projections are pure FFMAs (NK+1 per element of x, with the sum of squares) with no
  per-chunk reduction; the sum over streams for layer_input is in-thread. Cross-thread reductions
  happen once per token block.
  _fwd_kernel, persistent grid = min(token blocks, SMs * fwd_ctas_per_sm); program p takes token
  blocks p, p + grid, ...; per block:
    pass 1 over C chunks (next chunk prefetched into registers): sums of squares and the NK
      projections in fp32; then r, z, tanh, h_pre / h_post / h_res in registers (z, r saved for
      backward);
    pass 2 over the same chunks in reverse order: layer_input = sum_i h_pre[i] x[i].
    Pass 2 re-reads the block just read, so it should hit L2: pass-1 loads bypass L1 (.cg, so L1
    keeps w, loaded evict_last), pass-2 loads are evict_first, and the grid bounds the tokens in
    flight: L2 working set ~ grid * BT * 2nC bytes (264 x 1 x 57 KB = 15 MB for n = 4, C = 7168).
    DRAM bytes per token: read 2nC, write 2C + 4(n + n^2) (h_post, h_res), + 4n(NK+1) (z, r)
    when a gradient will be needed. hc_coeffs runs pass 1 only.

Backward, two kernels (u = r*dz, e = r^2 * mean_c(dxn*xn) = r^2/C * sum_k dz_k z_k):
  _bwd_coef_kernel, grid = cdiv(T, GT), each program loops over GT tokens in blocks of BT:
    dh_pre = g_li . x[i] (one pass over x and g_li; none for hc_coeffs) + upstream dh_pre,
    dp = s * dh, dz = (1 - p^2) dp, ds and db_pre partials per program (summed by torch);
    writes coef [T, n, NKC] = (u_0..u_{NK-1}, h_pre, e, pad; NKC = n+4 rounded up to 4: 16-byte
    rows). db_post, db_res are torch sums of the upstream gradients. 245 us at C = 4096
    (2 warps, b1_cp 1).
  _bwd_dx_mma_kernel (b2_impl="mma", the default), rows = (token, stream) pairs of x viewed as
    [T*n, C]; program = (b2_bc columns, a range of rows), column block fastest, row ranges
    last-first (the first reads hit what _bwd_coef_kernel left in L2); per b2_bm rows, loads
    pipelined through shared memory (b2_stages):
      dx = u @ w^T (tensor cores, tf32, K = NK padded to 16) - e x + h_pre g_li   (RMSNorm
        backward folded in; g_li's row is row // n) [+ the dx already in the output: ACC]
      dw partial [BC, 16] += x^T @ u on tensor cores: x as loaded (bf16) times u split into
        hi + lo in bf16 (fp32 accumulation: x exact, u to ~16 bits; b2_dw="tf32" or fp16 x: x in
        fp32 and tf32 products), written once per program as [groups, C, NK], summed by torch.
    Addresses are a 64-bit scalar base per row block plus loop-invariant 32-bit offsets, and
    whole blocks (C % b2_bc == 0, T*n % b2_bm == 0) drop every mask, so few registers go to the
    pipeline: 126 at 64 x 64 x 4 warps (sm_90, triton 3.6; 164 with ACC). The grid is whole waves
    of the CTAs that fit on an SM (b2_ctas; 0: from the compiled kernel's registers and shared
    memory: 4 per SM, 3 with ACC). 453 us at C = 4096 (2.7 TB/s of DRAM traffic) against 1185 us
    for _bwd_dx_kernel in the same run; 653 us with ACC (in the site: nC more read); 794 us at
    C = 7168 (b2_stages=4: 446 / 768 us without ACC, but 2 CTAs per SM with it).
  _bwd_dx_kernel (b2_impl="fma"): the FMA version, grid = (C chunks, token groups), w's chunk in
    registers; dw partial [group, NK, C]; no in-place accumulation (a site link's dx is added by
    torch). Under triton 3.6 its in-thread reductions became shuffles and it spills.
  DRAM traffic per token: x and g_li read twice ((n+1)C elements per pass), dx written (nC; read
  too with ACC), + ~4n(3NK+8) bytes of coefficients and ~1% of dw partials. The fused floor reads x
  and g_li once;
  the second read is the price of dw: it needs the full-C reduction dh_pre first and a reduction
  over tokens after, which one token-major pass can only do with per-program [C, NK] partials
  (as much traffic again) or millions of atomics.

Site link (kernels/site_link.py): hc_pre and hc_coeffs attach a link for the caller's x to
h_res. A post given that h_res and the same x (kernels/triton/post.py) hands its dx over instead
of returning it; the backward takes it first (site_link.accumulator) and _bwd_dx_mma_kernel adds
its own dx into it in place (nC more bytes read, instead of autograd's separate 3nC add).

Offsets: per-token (per-row-block) bases are int64 (T*n*C may exceed 2^31); the FMA kernels
get C as C/8 so that the compiler knows every row starts 16-byte aligned (the others rely on
triton's divisibility-by-16 specialisation of C).

Tuning: keyword `config` (dict or "key=value,..." string) or the environment variable
HCBENCH_HC_PRE (same string form); keys in DEFAULT_CONFIG. dev/tune_hc_pre.py times variants.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels import reference, site_link
from kernels.colsum import column_sums
from kernels.hilo import split_hi_lo
from kernels.triton.apply_pre import apply_pre
from kernels.triton.common import (check_state, check_tensor, dot_xT_hilo, interpreting, num_sms,
                                    store_grad)

EPS = reference.EPS_RMS

# *_bt = 0: tokens per block chosen so that BT * NP is about *_rows (rows live in each thread).
DEFAULT_CONFIG = {
    "fwd_bt": 0, "fwd_rows": 4, "fwd_warps": 8,
    "fwd_ctas_per_sm": 2,    # persistent grid of SMs * this programs (0: one program per block)
    "fwd_prefetch": 1,       # load chunk j+1 while reducing chunk j (register double buffer)
    "fwd_cp": 2,             # int32 pairs of x per thread and row per chunk (2*cp columns)
    "x_hint": "cg",          # pass-1 x loads: "cg" (bypass L1, which keeps w), "evict_last" (L1 and
                             # L2 evict_last; PTX cannot combine it with .cg) or "none"
    "w_hint": "evict_last",  # w loads (L1 and L2 evict_last) or "none"
    "evict2": 1,             # pass-2 x loads evict_first (their last use)
    # fwd_impl "gemm" (the default since an H100 run timed it at 2.0-2.3x the FMA forward): the
    # projections on tensor cores with x viewed as [T*n, C] rows, w split into hi + lo in x's
    # dtype, then a separate apply kernel; "fma" is the one-kernel FMA forward (_fwd_kernel)
    "fwd_impl": "gemm", "gemm_bm": 64, "gemm_bk": 128, "gemm_warps": 4, "gemm_stages": 4,
    "apply_bt": 16, "apply_bc": 256,
    # coefficient backward: 2 warps of one int32 pair per thread and chunk (H100, bf16, n = 4,
    # T = 16384: 166 / 245 / 416 us at C = 2560 / 4096 / 7168 against 198 / 282 / 453 us with 4
    # warps and 2 pairs; dev/logs/tuning-20261124-h100/hc_b1_probe.txt)
    "b1_bt": 0, "b1_rows": 8, "b1_warps": 2, "b1_programs": 8192, "b1_prefetch": 1, "b1_cp": 1,
    # dx / dw kernel: b2_impl "mma" (_bwd_dx_mma_kernel, tensor cores; keys b2_bm, b2_bc,
    # b2_warps, b2_stages, b2_ctas, b2_dw) or "fma" (_bwd_dx_kernel; b2_bt, b2_rows, b2_warps,
    # b2_programs, b2_prefetch, b2_cp)
    "b2_impl": "mma", "b2_bm": 64, "b2_bc": 64, "b2_stages": 3, "b2_ctas": 0, "b2_dw": "bf16",
    "b2_bt": 0, "b2_rows": 4, "b2_warps": 4, "b2_programs": 1056, "b2_prefetch": 1, "b2_cp": 2,
}
# The interpreter pays per program and per op, not per byte: big token blocks, few programs.
INTERPRETER_CONFIG = {"fwd_rows": 32, "b1_rows": 32, "b2_rows": 32, "b1_programs": 2,
                      "b2_programs": 2}


# ------------------------------------------------------------------------------------ kernels
@triton.jit
def _tanh(z):
    a = tl.abs(z)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def _unpack(v, IS_BF16: tl.constexpr):
    """int32 holding two 16-bit floats (little endian) -> (even column, odd column) in fp32."""
    if IS_BF16:
        lo = (v << 16).to(tl.float32, bitcast=True)
        hi = (v & -65536).to(tl.float32, bitcast=True)
    else:
        lo = v.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (v >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _pack(lo, hi, dtype: tl.constexpr, NTH: tl.constexpr, CP: tl.constexpr):
    """(even, odd) [BT, R, NTH, CP] fp32 -> [BT, R, NTH, 2*CP] in dtype, columns in memory order."""
    v = tl.join(lo, hi)
    return tl.reshape(v, [v.shape[0], v.shape[1], NTH, 2 * CP]).to(dtype)


@triton.jit
def _wpair(wt_ptr, K: tl.constexpr, CW, wcol, NTH: tl.constexpr, CP: tl.constexpr,
           WEV: tl.constexpr):
    """w[:, K] at the thread's columns -> (even, odd) [1, 1, NTH, CP] fp32. wt is [NK, CW], zero
    padded to a whole number of chunks, so the load needs no mask."""
    w = tl.load(wt_ptr + K * CW + wcol, eviction_policy=WEV)
    return tl.split(tl.reshape(w, [1, 1, NTH, CP, 2]))


@triton.jit
def _red23(a):
    return tl.sum(tl.sum(a, axis=3), axis=2)


@triton.jit
def _fwd_res(acc, r, J: tl.constexpr, sa, b_ptr, hres_ptr, z_ptr, t2, i2, m2,
             N: tl.constexpr, NK: tl.constexpr, SAVE: tl.constexpr):
    z = _red23(acc) * r
    if SAVE:
        tl.store(z_ptr + (t2 * N + i2) * NK + 2 + J, z, mask=m2)
    h = sa * _tanh(z) + tl.load(b_ptr + 2 * N + J * N + i2, mask=i2 < N, other=0.0)
    tl.store(hres_ptr + t2 * (N * N) + J * N + i2, h, mask=m2)


@triton.jit
def _fwd_kernel(x_ptr, wt_ptr, b_ptr, s_ptr,
                li_ptr, hpre_ptr, hpost_ptr, hres_ptr, z_ptr, r_ptr,
                T, C8, CW, eps, NPROG,
                N: tl.constexpr, NP: tl.constexpr, NK: tl.constexpr,
                BT: tl.constexpr, NTH: tl.constexpr, CP: tl.constexpr, IS_BF16: tl.constexpr,
                WRITE_LI: tl.constexpr, WRITE_HPRE: tl.constexpr, SAVE: tl.constexpr,
                PREFETCH: tl.constexpr, X_CACHE: tl.constexpr, EV1: tl.constexpr,
                EV2: tl.constexpr, WEV: tl.constexpr):
    # x_ptr: x viewed as int32 [T, N, C/2] (pairs of bf16/fp16); li_ptr: [T, C] in x's dtype
    C = C8 * 8
    C2 = C8 * 4
    BP: tl.constexpr = NTH * CP                 # int32 pairs per chunk (2 * BP columns)
    pid = tl.program_id(0)
    bt = tl.arange(0, BT)[:, None, None, None]
    ii = tl.arange(0, NP)[None, :, None, None]
    pcol = tl.arange(0, NTH)[None, None, :, None] * CP + tl.arange(0, CP)[None, None, None, :]
    wcol = tl.arange(0, NTH)[None, None, :, None] * (2 * CP) + tl.arange(0, 2 * CP)[None, None, None, :]
    i2 = tl.arange(0, NP)[None, :]
    sa = tl.load(s_ptr)
    sb = tl.load(s_ptr + 1)
    bpre = tl.load(b_ptr + i2, mask=i2 < N, other=0.0)
    bpost = tl.load(b_ptr + N + i2, mask=i2 < N, other=0.0)
    nch = tl.cdiv(C2, BP)
    nblk = tl.cdiv(T, BT)
    # persistent: program pid takes token blocks pid, pid + NPROG, ... (NPROG bounds the tokens
    # resident on the GPU, hence the L2 working set of the pass-2 re-read)
    for blk in range(pid, nblk, NPROG):
        tok = blk * BT + bt
        tmask = tok < T
        rmask = tmask & (ii < N)
        xrow = x_ptr + tok.to(tl.int64) * (N * C2) + ii * C2

        # ---- pass 1: sums of squares and the NK projections (unnormalised), fp32 FMAs
        ss = tl.zeros([BT, NP, NTH, CP], dtype=tl.float32)
        a0 = tl.zeros([BT, NP, NTH, CP], dtype=tl.float32)
        a1 = tl.zeros([BT, NP, NTH, CP], dtype=tl.float32)
        a2 = tl.zeros([BT, NP, NTH, CP], dtype=tl.float32)
        a3 = tl.zeros([BT, NP, NTH, CP], dtype=tl.float32)
        a4 = tl.zeros([BT, NP, NTH, CP], dtype=tl.float32)
        a5 = tl.zeros([BT, NP, NTH, CP], dtype=tl.float32)
        a6 = tl.zeros([BT, NP, NTH, CP], dtype=tl.float32)
        a7 = tl.zeros([BT, NP, NTH, CP], dtype=tl.float32)
        a8 = tl.zeros([BT, NP, NTH, CP], dtype=tl.float32)
        a9 = tl.zeros([BT, NP, NTH, CP], dtype=tl.float32)
        if PREFETCH:
            vnext = tl.load(xrow + pcol, mask=rmask & (pcol < C2), other=0,
                            cache_modifier=X_CACHE, eviction_policy=EV1)
        for p0 in range(0, C2, BP):
            pc = p0 + pcol
            if PREFETCH:
                v = vnext
                vnext = tl.load(xrow + pc + BP, mask=rmask & (pc + BP < C2), other=0,
                                cache_modifier=X_CACHE, eviction_policy=EV1)
            else:
                v = tl.load(xrow + pc, mask=rmask & (pc < C2), other=0,
                            cache_modifier=X_CACHE, eviction_policy=EV1)
            lo, hi = _unpack(v, IS_BF16)
            ss += lo * lo
            ss += hi * hi
            wc = 2 * p0 + wcol
            we, wo = _wpair(wt_ptr, 0, CW, wc, NTH, CP, WEV)
            a0 += lo * we
            a0 += hi * wo
            we, wo = _wpair(wt_ptr, 1, CW, wc, NTH, CP, WEV)
            a1 += lo * we
            a1 += hi * wo
            we, wo = _wpair(wt_ptr, 2, CW, wc, NTH, CP, WEV)
            a2 += lo * we
            a2 += hi * wo
            if NK > 3:
                we, wo = _wpair(wt_ptr, 3, CW, wc, NTH, CP, WEV)
                a3 += lo * we
                a3 += hi * wo
            if NK > 4:
                we, wo = _wpair(wt_ptr, 4, CW, wc, NTH, CP, WEV)
                a4 += lo * we
                a4 += hi * wo
            if NK > 5:
                we, wo = _wpair(wt_ptr, 5, CW, wc, NTH, CP, WEV)
                a5 += lo * we
                a5 += hi * wo
            if NK > 6:
                we, wo = _wpair(wt_ptr, 6, CW, wc, NTH, CP, WEV)
                a6 += lo * we
                a6 += hi * wo
            if NK > 7:
                we, wo = _wpair(wt_ptr, 7, CW, wc, NTH, CP, WEV)
                a7 += lo * we
                a7 += hi * wo
            if NK > 8:
                we, wo = _wpair(wt_ptr, 8, CW, wc, NTH, CP, WEV)
                a8 += lo * we
                a8 += hi * wo
            if NK > 9:
                we, wo = _wpair(wt_ptr, 9, CW, wc, NTH, CP, WEV)
                a9 += lo * we
                a9 += hi * wo

        # ---- coefficients, per (token, stream) in registers
        r = tl.rsqrt(_red23(ss) / C + eps)                          # [BT, NP]
        t2 = blk * BT + tl.arange(0, BT)[:, None]
        m2 = (t2 < T) & (i2 < N)
        if SAVE:
            tl.store(r_ptr + t2 * N + i2, r, mask=m2)
        z = _red23(a0) * r
        if SAVE:
            tl.store(z_ptr + (t2 * N + i2) * NK, z, mask=m2)
        hpre = tl.where(m2, sa * _tanh(z) + bpre, 0.0)
        if WRITE_HPRE:
            tl.store(hpre_ptr + t2 * N + i2, hpre, mask=m2)
        z = _red23(a1) * r
        if SAVE:
            tl.store(z_ptr + (t2 * N + i2) * NK + 1, z, mask=m2)
        tl.store(hpost_ptr + t2 * N + i2, sb * _tanh(z) + bpost, mask=m2)
        _fwd_res(a2, r, 0, sa, b_ptr, hres_ptr, z_ptr, t2, i2, m2, N, NK, SAVE)
        if NK > 3:
            _fwd_res(a3, r, 1, sa, b_ptr, hres_ptr, z_ptr, t2, i2, m2, N, NK, SAVE)
        if NK > 4:
            _fwd_res(a4, r, 2, sa, b_ptr, hres_ptr, z_ptr, t2, i2, m2, N, NK, SAVE)
        if NK > 5:
            _fwd_res(a5, r, 3, sa, b_ptr, hres_ptr, z_ptr, t2, i2, m2, N, NK, SAVE)
        if NK > 6:
            _fwd_res(a6, r, 4, sa, b_ptr, hres_ptr, z_ptr, t2, i2, m2, N, NK, SAVE)
        if NK > 7:
            _fwd_res(a7, r, 5, sa, b_ptr, hres_ptr, z_ptr, t2, i2, m2, N, NK, SAVE)
        if NK > 8:
            _fwd_res(a8, r, 6, sa, b_ptr, hres_ptr, z_ptr, t2, i2, m2, N, NK, SAVE)
        if NK > 9:
            _fwd_res(a9, r, 7, sa, b_ptr, hres_ptr, z_ptr, t2, i2, m2, N, NK, SAVE)

        # ---- pass 2 (reverse chunk order, L2 hits): layer_input = sum_i h_pre[i] x[i]
        if WRITE_LI:
            hp = hpre[:, :, None, None]
            lirow = li_ptr + tok.to(tl.int64) * C
            last = (nch - 1) * BP
            if PREFETCH:
                vnext = tl.load(xrow + last + pcol, mask=rmask & (last + pcol < C2), other=0,
                                eviction_policy=EV2)
            for j in range(0, nch):
                p0 = last - j * BP
                pc = p0 + pcol
                if PREFETCH:
                    v = vnext
                    vnext = tl.load(xrow + pc - BP, mask=rmask & (pc >= BP), other=0,
                                    eviction_policy=EV2)
                else:
                    v = tl.load(xrow + pc, mask=rmask & (pc < C2), other=0, eviction_policy=EV2)
                lo, hi = _unpack(v, IS_BF16)
                li_lo = tl.sum(lo * hp, axis=1, keep_dims=True)          # [BT, 1, NTH, CP]
                li_hi = tl.sum(hi * hp, axis=1, keep_dims=True)
                oc = 2 * p0 + wcol
                tl.store(lirow + oc, _pack(li_lo, li_hi, li_ptr.dtype.element_ty, NTH, CP),
                         mask=tmask & (oc < C))


@triton.jit
def _fwd_gemm_kernel(x_ptr, whi_ptr, wlo_ptr, b_ptr, s_ptr, hpre_ptr, hpost_ptr, hres_ptr, z_ptr, r_ptr,
                     R, C, EPS,
                     N: tl.constexpr, NK: tl.constexpr, NKP: tl.constexpr,
                     BM: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr, SAVE: tl.constexpr,
                     DOT_F32: tl.constexpr):
    # Rows are (token, stream) pairs of x viewed as [T*n, C], so every row's epilogue is its own:
    # r, z = r * (x_row . w), tanh, then h_pre[t, i], h_post[t, i] and column i of h_res[t].
    # w is [C, NKP] in x's dtype twice (hi + lo): two tensor-core products with fp32 accumulation
    # give the projections to ~16 bits of w, and x goes to the tensor cores as loaded.
    row = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = row < R
    r64 = row.to(tl.int64)
    kk = tl.arange(0, BK)
    kcol = tl.arange(0, NKP)
    acc = tl.zeros([BM, NKP], dtype=tl.float32)
    ss = tl.zeros([BM], dtype=tl.float32)
    for k0 in tl.range(0, C, BK, num_stages=STAGES):
        c = k0 + kk
        cm = c < C
        xt = tl.load(x_ptr + r64[:, None] * C + c[None, :], mask=rmask[:, None] & cm[None, :], other=0.0)
        xf = xt.to(tl.float32)
        ss += tl.sum(xf * xf, axis=1)
        woff = c[:, None] * NKP + kcol[None, :]
        whi = tl.load(whi_ptr + woff, mask=cm[:, None], other=0.0)
        wlo = tl.load(wlo_ptr + woff, mask=cm[:, None], other=0.0)
        if DOT_F32:
            # the interpreter multiplies 16-bit float tiles as their bit patterns: same values in fp32
            acc = tl.dot(xf, whi.to(tl.float32), acc, input_precision="ieee")
            acc = tl.dot(xf, wlo.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, whi, acc)
            acc = tl.dot(xt, wlo, acc)
    r = 1.0 / tl.sqrt(ss / C + EPS)
    z = acc * r[:, None]
    t = r64 // N
    i = r64 % N
    kc = kcol[None, :]
    zm = rmask[:, None] & (kc < NK)
    if SAVE:
        tl.store(z_ptr + r64[:, None] * NK + kc, z, mask=zm)
        tl.store(r_ptr + r64, r, mask=rmask)
    p = _tanh(z)
    sa = tl.load(s_ptr)
    sb = tl.load(s_ptr + 1)
    p0 = tl.sum(tl.where(kc == 0, p, 0.0), axis=1)
    p1 = tl.sum(tl.where(kc == 1, p, 0.0), axis=1)
    tl.store(hpre_ptr + r64, sa * p0 + tl.load(b_ptr + i, mask=rmask, other=0.0), mask=rmask)
    tl.store(hpost_ptr + r64, sb * p1 + tl.load(b_ptr + N + i, mask=rmask, other=0.0), mask=rmask)
    # column k = 2 + j of this row is h_res[t, j, i] (destination j, source i)
    j = kc - 2
    hm = rmask[:, None] & (kc >= 2) & (kc < NK)
    bres = tl.load(b_ptr + 2 * N + j * N + i[:, None], mask=hm, other=0.0)
    tl.store(hres_ptr + t[:, None] * (N * N) + j * N + i[:, None], sa * p + bres, mask=hm)


@triton.jit
def _bwd_res(zrow, crow, gres_ptr, t2, i2, m2, r, sa, J: tl.constexpr, N: tl.constexpr):
    z = tl.load(zrow + 2 + J, mask=m2, other=0.0)
    p = _tanh(z)
    gr = tl.load(gres_ptr + t2 * (N * N) + J * N + i2, mask=m2, other=0.0)
    dz = sa * gr * (1.0 - p * p)
    tl.store(crow + 2 + J, r * dz, mask=m2)
    return dz * z, p * gr


@triton.jit
def _bwd_coef_kernel(x_ptr, g_ptr, gpre_ptr, gpost_ptr, gres_ptr, z_ptr, r_ptr, b_ptr, s_ptr,
                     coef_ptr, part_ptr,
                     T, C8, GT,
                     N: tl.constexpr, NP: tl.constexpr, NK: tl.constexpr, NKC: tl.constexpr,
                     PW: tl.constexpr, BT: tl.constexpr, NTH: tl.constexpr, CP: tl.constexpr,
                     IS_BF16: tl.constexpr, HAS_G: tl.constexpr, HAS_GPRE: tl.constexpr,
                     PREFETCH: tl.constexpr):
    # x_ptr: int32 [T, N, C/2]; g_ptr: int32 [T, C/2] (pairs)
    C = C8 * 8
    C2 = C8 * 4
    BP: tl.constexpr = NTH * CP
    pid = tl.program_id(0)
    sa = tl.load(s_ptr)
    sb = tl.load(s_ptr + 1)
    bt = tl.arange(0, BT)[:, None, None, None]
    ii = tl.arange(0, NP)[None, :, None, None]
    pcol = tl.arange(0, NTH)[None, None, :, None] * CP + tl.arange(0, CP)[None, None, None, :]
    i2 = tl.arange(0, NP)[None, :]
    bpre = tl.load(b_ptr + i2, mask=i2 < N, other=0.0)
    acc_sa = tl.zeros([BT, NP], dtype=tl.float32)
    acc_sb = tl.zeros([BT, NP], dtype=tl.float32)
    acc_db = tl.zeros([BT, NP], dtype=tl.float32)
    for tb in range(0, GT, BT):
        t0 = pid * GT + tb
        t2 = t0 + tl.arange(0, BT)[:, None]
        m2 = (t2 < T) & (i2 < N)
        if HAS_G:
            tok = t0 + bt
            tmask = tok < T
            rmask = tmask & (ii < N)
            xrow = x_ptr + tok.to(tl.int64) * (N * C2) + ii * C2
            grow = g_ptr + tok.to(tl.int64) * C2
            acc = tl.zeros([BT, NP, NTH, CP], dtype=tl.float32)
            if PREFETCH:
                vnext = tl.load(xrow + pcol, mask=rmask & (pcol < C2), other=0)
                gnext = tl.load(grow + pcol, mask=tmask & (pcol < C2), other=0)
            for p0 in range(0, C2, BP):
                pc = p0 + pcol
                if PREFETCH:
                    v = vnext
                    gv = gnext
                    nm = pc + BP < C2
                    vnext = tl.load(xrow + pc + BP, mask=rmask & nm, other=0)
                    gnext = tl.load(grow + pc + BP, mask=tmask & nm, other=0)
                else:
                    v = tl.load(xrow + pc, mask=rmask & (pc < C2), other=0)
                    gv = tl.load(grow + pc, mask=tmask & (pc < C2), other=0)
                lo, hi = _unpack(v, IS_BF16)
                glo, ghi = _unpack(gv, IS_BF16)
                acc += lo * glo
                acc += hi * ghi
            dh = _red23(acc)
        else:
            dh = tl.zeros([BT, NP], dtype=tl.float32)
        if HAS_GPRE:
            dh += tl.load(gpre_ptr + t2 * N + i2, mask=m2, other=0.0)
        dh = tl.where(m2, dh, 0.0)
        r = tl.load(r_ptr + t2 * N + i2, mask=m2, other=0.0)
        zrow = z_ptr + (t2 * N + i2) * NK
        crow = coef_ptr + (t2 * N + i2) * NKC
        # k = 0: h_pre
        z = tl.load(zrow, mask=m2, other=0.0)
        p = _tanh(z)
        dz = sa * dh * (1.0 - p * p)
        mm = dz * z
        tl.store(crow, r * dz, mask=m2)
        tl.store(crow + NK, sa * p + bpre, mask=m2)
        acc_sa += p * dh
        acc_db += dh
        # k = 1: h_post
        z = tl.load(zrow + 1, mask=m2, other=0.0)
        p = _tanh(z)
        gp = tl.load(gpost_ptr + t2 * N + i2, mask=m2, other=0.0)
        dz = sb * gp * (1.0 - p * p)
        mm += dz * z
        tl.store(crow + 1, r * dz, mask=m2)
        acc_sb += p * gp
        # k = 2 + j: column i of h_res (row j)
        for j in tl.static_range(N):
            dm, ds = _bwd_res(zrow, crow, gres_ptr, t2, i2, m2, r, sa, j, N)
            mm += dm
            acc_sa += ds
        tl.store(crow + NK + 1, r * r * mm / C, mask=m2)
    prow = part_ptr + pid * PW
    tl.store(prow, tl.sum(acc_sa))
    tl.store(prow + 1, tl.sum(acc_sb))
    i1 = tl.arange(0, NP)
    tl.store(prow + 2 + i1, tl.sum(acc_db, axis=0), mask=i1 < N)


@triton.jit
def _red01(v):
    return tl.sum(tl.sum(v, axis=1, keep_dims=True), axis=0, keep_dims=True)


@triton.jit
def _dw_store(dwrow, K: tl.constexpr, C, de, do, wc, wm, NTH: tl.constexpr, CP: tl.constexpr):
    tl.store(dwrow + K * C + wc, _pack(de, do, tl.float32, NTH, CP), mask=wm)


@triton.jit
def _bwd_dx_kernel(x_ptr, g_ptr, wt_ptr, coef_ptr, dx_ptr, dwp_ptr,
                   T, C8, CW, GT,
                   N: tl.constexpr, NP: tl.constexpr, NK: tl.constexpr, NKC: tl.constexpr,
                   BT: tl.constexpr, NTH: tl.constexpr, CP: tl.constexpr, IS_BF16: tl.constexpr,
                   HAS_G: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DW: tl.constexpr,
                   PREFETCH: tl.constexpr):
    # x_ptr: int32 [T, N, C/2]; g_ptr: int32 [T, C/2]; dx_ptr: [T, N, C] in x's dtype
    C = C8 * 8
    C2 = C8 * 4
    BP: tl.constexpr = NTH * CP
    pcb = tl.program_id(0)
    pg = tl.program_id(1)
    bt = tl.arange(0, BT)[:, None, None, None]
    ii = tl.arange(0, NP)[None, :, None, None]
    pc = pcb * BP + tl.arange(0, NTH)[None, None, :, None] * CP + tl.arange(0, CP)[None, None, None, :]
    pm = pc < C2
    wc = 2 * pcb * BP + (tl.arange(0, NTH)[None, None, :, None] * (2 * CP)
                         + tl.arange(0, 2 * CP)[None, None, None, :])
    wm = wc < C
    zero = tl.zeros([1, 1, NTH, CP], dtype=tl.float32)
    we0, wo0 = _wpair(wt_ptr, 0, CW, wc, NTH, CP, "")
    we1, wo1 = _wpair(wt_ptr, 1, CW, wc, NTH, CP, "")
    we2, wo2 = _wpair(wt_ptr, 2, CW, wc, NTH, CP, "")
    we3, wo3, we4, wo4, we5, wo5 = zero, zero, zero, zero, zero, zero
    we6, wo6, we7, wo7, we8, wo8, we9, wo9 = zero, zero, zero, zero, zero, zero, zero, zero
    if NK > 3:
        we3, wo3 = _wpair(wt_ptr, 3, CW, wc, NTH, CP, "")
    if NK > 4:
        we4, wo4 = _wpair(wt_ptr, 4, CW, wc, NTH, CP, "")
    if NK > 5:
        we5, wo5 = _wpair(wt_ptr, 5, CW, wc, NTH, CP, "")
    if NK > 6:
        we6, wo6 = _wpair(wt_ptr, 6, CW, wc, NTH, CP, "")
    if NK > 7:
        we7, wo7 = _wpair(wt_ptr, 7, CW, wc, NTH, CP, "")
    if NK > 8:
        we8, wo8 = _wpair(wt_ptr, 8, CW, wc, NTH, CP, "")
    if NK > 9:
        we9, wo9 = _wpair(wt_ptr, 9, CW, wc, NTH, CP, "")
    de0, do0, de1, do1, de2, do2, de3, do3 = zero, zero, zero, zero, zero, zero, zero, zero
    de4, do4, de5, do5, de6, do6, de7, do7 = zero, zero, zero, zero, zero, zero, zero, zero
    de8, do8, de9, do9 = zero, zero, zero, zero
    LOAD_G: tl.constexpr = HAS_G and WRITE_DX
    tend = tl.minimum(T, pg * GT + GT)
    if PREFETCH:
        tok = pg * GT + bt
        vnext = tl.load(x_ptr + tok.to(tl.int64) * (N * C2) + ii * C2 + pc,
                        mask=(tok < tend) & (ii < N) & pm, other=0)
        if LOAD_G:
            gnext = tl.load(g_ptr + tok.to(tl.int64) * C2 + pc, mask=(tok < tend) & pm, other=0)
    for tb in range(0, GT, BT):
        tok = pg * GT + tb + bt
        tmask = tok < tend
        rmask = tmask & (ii < N)
        if PREFETCH:
            v = vnext
            nt = tok + BT
            nm = (nt < tend) & pm
            vnext = tl.load(x_ptr + nt.to(tl.int64) * (N * C2) + ii * C2 + pc,
                            mask=nm & (ii < N), other=0)
            if LOAD_G:
                gv = gnext
                gnext = tl.load(g_ptr + nt.to(tl.int64) * C2 + pc, mask=nm, other=0)
        else:
            v = tl.load(x_ptr + tok.to(tl.int64) * (N * C2) + ii * C2 + pc, mask=rmask & pm,
                        other=0)
            if LOAD_G:
                gv = tl.load(g_ptr + tok.to(tl.int64) * C2 + pc, mask=tmask & pm, other=0)
        lo, hi = _unpack(v, IS_BF16)
        crow = coef_ptr + (tok * N + ii) * NKC                      # [BT, NP, 1, 1]
        u0 = tl.load(crow, mask=rmask, other=0.0)
        u1 = tl.load(crow + 1, mask=rmask, other=0.0)
        u2 = tl.load(crow + 2, mask=rmask, other=0.0)
        if NK > 3:
            u3 = tl.load(crow + 3, mask=rmask, other=0.0)
        if NK > 4:
            u4 = tl.load(crow + 4, mask=rmask, other=0.0)
        if NK > 5:
            u5 = tl.load(crow + 5, mask=rmask, other=0.0)
        if NK > 6:
            u6 = tl.load(crow + 6, mask=rmask, other=0.0)
        if NK > 7:
            u7 = tl.load(crow + 7, mask=rmask, other=0.0)
        if NK > 8:
            u8 = tl.load(crow + 8, mask=rmask, other=0.0)
        if NK > 9:
            u9 = tl.load(crow + 9, mask=rmask, other=0.0)
        if WRITE_DX:
            e = tl.load(crow + NK + 1, mask=rmask, other=0.0)
            dlo = u0 * we0 - e * lo
            dhi = u0 * wo0 - e * hi
            dlo += u1 * we1
            dhi += u1 * wo1
            dlo += u2 * we2
            dhi += u2 * wo2
            if NK > 3:
                dlo += u3 * we3
                dhi += u3 * wo3
            if NK > 4:
                dlo += u4 * we4
                dhi += u4 * wo4
            if NK > 5:
                dlo += u5 * we5
                dhi += u5 * wo5
            if NK > 6:
                dlo += u6 * we6
                dhi += u6 * wo6
            if NK > 7:
                dlo += u7 * we7
                dhi += u7 * wo7
            if NK > 8:
                dlo += u8 * we8
                dhi += u8 * wo8
            if NK > 9:
                dlo += u9 * we9
                dhi += u9 * wo9
            if LOAD_G:
                a = tl.load(crow + NK, mask=rmask, other=0.0)
                glo, ghi = _unpack(gv, IS_BF16)
                dlo += a * glo
                dhi += a * ghi
            oc = tok.to(tl.int64) * (N * C) + ii * C + wc
            tl.store(dx_ptr + oc, _pack(dlo, dhi, dx_ptr.dtype.element_ty, NTH, CP),
                     mask=rmask & wm)
        if WRITE_DW:
            de0 += _red01(lo * u0)
            do0 += _red01(hi * u0)
            de1 += _red01(lo * u1)
            do1 += _red01(hi * u1)
            de2 += _red01(lo * u2)
            do2 += _red01(hi * u2)
            if NK > 3:
                de3 += _red01(lo * u3)
                do3 += _red01(hi * u3)
            if NK > 4:
                de4 += _red01(lo * u4)
                do4 += _red01(hi * u4)
            if NK > 5:
                de5 += _red01(lo * u5)
                do5 += _red01(hi * u5)
            if NK > 6:
                de6 += _red01(lo * u6)
                do6 += _red01(hi * u6)
            if NK > 7:
                de7 += _red01(lo * u7)
                do7 += _red01(hi * u7)
            if NK > 8:
                de8 += _red01(lo * u8)
                do8 += _red01(hi * u8)
            if NK > 9:
                de9 += _red01(lo * u9)
                do9 += _red01(hi * u9)
    if WRITE_DW:
        dwrow = dwp_ptr + pg.to(tl.int64) * (NK * C)
        _dw_store(dwrow, 0, C, de0, do0, wc, wm, NTH, CP)
        _dw_store(dwrow, 1, C, de1, do1, wc, wm, NTH, CP)
        _dw_store(dwrow, 2, C, de2, do2, wc, wm, NTH, CP)
        if NK > 3:
            _dw_store(dwrow, 3, C, de3, do3, wc, wm, NTH, CP)
        if NK > 4:
            _dw_store(dwrow, 4, C, de4, do4, wc, wm, NTH, CP)
        if NK > 5:
            _dw_store(dwrow, 5, C, de5, do5, wc, wm, NTH, CP)
        if NK > 6:
            _dw_store(dwrow, 6, C, de6, do6, wc, wm, NTH, CP)
        if NK > 7:
            _dw_store(dwrow, 7, C, de7, do7, wc, wm, NTH, CP)
        if NK > 8:
            _dw_store(dwrow, 8, C, de8, do8, wc, wm, NTH, CP)
        if NK > 9:
            _dw_store(dwrow, 9, C, de9, do9, wc, wm, NTH, CP)


@triton.jit
def _bwd_dx_mma_kernel(x_ptr, g_ptr, w_ptr, coef_ptr, dx_ptr, dwp_ptr,
                       R, C8, GR, NCB, NG,
                       N: tl.constexpr, NK: tl.constexpr, NKC: tl.constexpr, KP: tl.constexpr,
                       BM: tl.constexpr, BC: tl.constexpr, STAGES: tl.constexpr,
                       HAS_G: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DW: tl.constexpr,
                       ACC: tl.constexpr, DW_BF16: tl.constexpr, DOT_F32: tl.constexpr,
                       EVEN_R: tl.constexpr, EVEN_C: tl.constexpr):
    # Rows are (token, stream) pairs of x viewed as [R = T*n, C]; coef [R, NKC] = (u_0..u_{NK-1},
    # h_pre, e, pad); g [T, C] (row r uses g[r // n]); w [C, NK] fp32; dx [R, C]; dwp [NG, C, NK].
    # Program (column block cb, row group pg), column block fastest; groups last-first and rows
    # from their end (the first reads hit what _bwd_coef_kernel left in L2). C = 8 * C8 (rows
    # 16-byte aligned for the compiler). Per BM rows:
    #   dx = u @ w^T (tensor cores, tf32) - e x + h_pre g   [+ dx already there: ACC]
    #   dw_partial += x^T @ u (tensor cores: bf16 x as loaded with u = hi + lo in bf16, or tf32)
    C = C8 * 8
    pid = tl.program_id(0)
    cb = pid % NCB
    pg = NG - 1 - pid // NCB
    c = cb * BC + tl.arange(0, BC)
    cm = c < C
    kk = tl.arange(0, KP)
    km = kk < NK
    if WRITE_DX:
        wt = tl.load(w_ptr + c[:, None] * NK + kk[None, :], mask=cm[:, None] & km[None, :], other=0.0)
        wT = tl.trans(wt)
    dw = tl.zeros([BC, KP], dtype=tl.float32)
    r_lo = pg * GR
    r_hi = tl.minimum(R, r_lo + GR)
    nb = tl.cdiv(r_hi - r_lo, BM)
    # 64-bit scalar base per row block + loop-invariant 32-bit offsets inside the block (few
    # address registers, nothing 64-bit per element)
    jj = tl.arange(0, BM)
    xo = jj[:, None] * C + c[None, :]
    co = jj[:, None] * NKC + kk[None, :]
    POW2: tl.constexpr = (N & (N - 1)) == 0
    if POW2:
        go = (jj // N)[:, None] * C + c[None, :]      # blocks start at a multiple of N
    for kb in tl.range(0, nb, num_stages=STAGES):
        row0 = r_lo + (nb - 1 - kb) * BM
        base = row0.to(tl.int64) * C
        # EVEN_R / EVEN_C: whole row blocks / column blocks, no masks (none to carry through the
        # software pipeline)
        if EVEN_R:
            rm = jj >= 0
        else:
            rm = jj < r_hi - row0
        if EVEN_C:
            lm = rm[:, None]
        else:
            lm = rm[:, None] & cm[None, :]
        if EVEN_R and EVEN_C:
            xt = tl.load(x_ptr + base + xo)
        else:
            xt = tl.load(x_ptr + base + xo, mask=lm, other=0.0)
        cptr = coef_ptr + row0.to(tl.int64) * NKC + co
        if EVEN_R:
            ct = tl.load(cptr, mask=(kk < NKC)[None, :], other=0.0)
        else:
            ct = tl.load(cptr, mask=rm[:, None] & (kk < NKC)[None, :], other=0.0)
        u = tl.where(km[None, :], ct, 0.0)
        if WRITE_DW:
            if DW_BF16:
                dw = dot_xT_hilo(xt, u, dw, DOT_F32)
            elif DOT_F32:
                dw = tl.dot(tl.trans(xt.to(tl.float32)), u, dw, input_precision="ieee")
            else:
                dw = tl.dot(tl.trans(xt.to(tl.float32)), u, dw, input_precision="tf32")
        if WRITE_DX:
            if DOT_F32:
                d = tl.dot(u, wT, input_precision="ieee")
            else:
                d = tl.dot(u, wT, input_precision="tf32")
            e = tl.sum(tl.where(kk[None, :] == NK + 1, ct, 0.0), axis=1)
            d -= e[:, None] * xt.to(tl.float32)
            if HAS_G:
                a = tl.sum(tl.where(kk[None, :] == NK, ct, 0.0), axis=1)
                gptr = g_ptr + (row0 // N).to(tl.int64) * C
                if POW2:
                    gptr += go
                else:
                    gptr += ((row0 % N + jj) // N)[:, None] * C + c[None, :]
                if EVEN_R and EVEN_C:
                    gt = tl.load(gptr)
                else:
                    gt = tl.load(gptr, mask=lm, other=0.0)
                d += a[:, None] * gt.to(tl.float32)
            optr = dx_ptr + base + xo
            store_grad(optr, d, lm, EVEN_R and EVEN_C, ACC)
    if WRITE_DW:
        tl.store(dwp_ptr + pg.to(tl.int64) * C * NK + c[:, None] * NK + kk[None, :], dw,
                 mask=cm[:, None] & km[None, :])


# ------------------------------------------------------------------------------------ host side
def _pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def parse_config(config=None) -> dict:
    """DEFAULT_CONFIG (+ INTERPRETER_CONFIG under TRITON_INTERPRET), then HCBENCH_HC_PRE from the
    environment, then `config` (dict or "key=value,..." string)."""
    cfg = dict(DEFAULT_CONFIG)
    if interpreting():
        cfg.update(INTERPRETER_CONFIG)
    for src in (os.environ.get("HCBENCH_HC_PRE", ""), config):
        if not src:
            continue
        if isinstance(src, str):
            src = dict(kv.split("=", 1) for kv in src.replace(" ", "").split(",") if kv)
        for key, val in src.items():
            if key not in DEFAULT_CONFIG:
                raise ValueError(f"hc_pre: unknown config key {key!r}; "
                                 f"known: {', '.join(DEFAULT_CONFIG)}")
            cfg[key] = val if isinstance(DEFAULT_CONFIG[key], str) else int(val)
    if cfg["x_hint"] not in ("cg", "evict_last", "none"):
        raise ValueError(f"hc_pre: x_hint must be 'cg', 'evict_last' or 'none', got {cfg['x_hint']!r}")
    if cfg["fwd_impl"] not in ("fma", "gemm"):
        raise ValueError(f"hc_pre: fwd_impl must be 'fma' or 'gemm', got {cfg['fwd_impl']!r}")
    for key in ("gemm_bm", "gemm_bk"):
        if cfg[key] < 16 or cfg[key] & (cfg[key] - 1):
            raise ValueError(f"hc_pre: {key} must be a power of two >= 16 (tensor-core tiles), "
                             f"got {cfg[key]}")
    if cfg["b2_impl"] not in ("mma", "fma"):
        raise ValueError(f"hc_pre: b2_impl must be 'mma' or 'fma', got {cfg['b2_impl']!r}")
    if cfg["b2_dw"] not in ("bf16", "tf32"):
        raise ValueError(f"hc_pre: b2_dw must be 'bf16' or 'tf32', got {cfg['b2_dw']!r}")
    if cfg["w_hint"] not in ("evict_last", "none"):
        raise ValueError(f"hc_pre: w_hint must be 'evict_last' or 'none', got {cfg['w_hint']!r}")
    return cfg


def _num_sms(device) -> int:
    return num_sms(device, interpreter_sms=2)


def _warps(want: int, C: int, cp: int) -> int:
    """num_warps, shrunk for narrow C so that a chunk (64 * warps * cp columns) is not mostly masked."""
    return max(1, min(_pow2(want), _pow2(triton.cdiv(C, 64 * cp))))


def _bt(explicit: int, rows: int, NP: int, T: int) -> int:
    bt = explicit if explicit > 0 else max(1, rows // NP)
    return max(1, min(_pow2(bt), _pow2(T)))


def _launch_fwd_gemm(x, w, b, s, with_li, save, cfg):
    T, n, C = x.shape
    NK, NKP = n + 2, 16
    dev, f32 = x.device, torch.float32
    w_hi, w_lo = split_hi_lo(w, x.dtype, NKP)
    hpre = torch.empty(T, n, device=dev, dtype=f32)
    hpost = torch.empty(T, n, device=dev, dtype=f32)
    hres = torch.empty(T, n, n, device=dev, dtype=f32)
    z = torch.empty(T, n, NK, device=dev, dtype=f32) if save else None
    r = torch.empty(T, n, device=dev, dtype=f32) if save else None
    bm = _pow2(cfg["gemm_bm"])
    _fwd_gemm_kernel[(triton.cdiv(T * n, bm),)](
        x, w_hi, w_lo, b, s, hpre, hpost, hres, z if save else hpost, r if save else hpost,
        T * n, C, EPS, N=n, NK=NK, NKP=NKP, BM=bm, BK=_pow2(cfg["gemm_bk"]),
        STAGES=cfg["gemm_stages"], SAVE=save, DOT_F32=interpreting(), num_warps=cfg["gemm_warps"])
    if not with_li:
        return hpre, hpost, hres, z, r
    li = torch.empty(T, C, device=dev, dtype=x.dtype)
    apply_pre(x, hpre, li, _pow2(cfg["apply_bt"]), _pow2(cfg["apply_bc"]))
    return li, hpost, hres, z, r


def _launch_fwd(x, wt, b, s, with_li, save, cfg):
    T, n, C = x.shape
    NP, NK = _pow2(n), n + 2
    dev = x.device
    cp = _pow2(cfg["fwd_cp"])
    warps = _warps(cfg["fwd_warps"], C, cp)
    BT = _bt(cfg["fwd_bt"], cfg["fwd_rows"], NP, T)
    f32 = torch.float32
    li = torch.empty(T, C, device=dev, dtype=x.dtype) if with_li else None
    hpre = None if with_li else torch.empty(T, n, device=dev, dtype=f32)
    hpost = torch.empty(T, n, device=dev, dtype=f32)
    hres = torch.empty(T, n, n, device=dev, dtype=f32)
    z = torch.empty(T, n, NK, device=dev, dtype=f32) if save else None
    r = torch.empty(T, n, device=dev, dtype=f32) if save else None
    dummy = hpost
    nblk = triton.cdiv(T, BT)
    nprog = nblk if cfg["fwd_ctas_per_sm"] <= 0 else min(nblk, _num_sms(dev) * cfg["fwd_ctas_per_sm"])
    _fwd_kernel[(nprog,)](
        x.view(torch.int32), wt, b, s,
        li if with_li else x, dummy if with_li else hpre, hpost, hres,
        z if save else dummy, r if save else dummy,
        T, C // 8, wt.shape[1], EPS, nprog,
        N=n, NP=NP, NK=NK, BT=BT, NTH=32 * warps, CP=cp, IS_BF16=x.dtype == torch.bfloat16,
        WRITE_LI=with_li, WRITE_HPRE=not with_li, SAVE=save,
        PREFETCH=bool(cfg["fwd_prefetch"]), X_CACHE=".cg" if cfg["x_hint"] == "cg" else "",
        EV1="evict_last" if cfg["x_hint"] == "evict_last" else "",
        EV2="evict_first" if cfg["evict2"] else "",
        WEV="evict_last" if cfg["w_hint"] == "evict_last" else "",
        num_warps=warps,
    )
    return li if with_li else hpre, hpost, hres, z, r


def _wt(w, T, n, C, cfg):
    """wT [NK, CW] for the FMA kernels: column-contiguous loads, zero padded to whole chunks of
    _fwd_kernel and the FMA _bwd_dx_kernel."""
    CW = C
    for key, cpk in (("fwd", "fwd_cp"), ("b2", "b2_cp")):
        chunk = 64 * _warps(cfg[key + "_warps"], C, _pow2(cfg[cpk])) * _pow2(cfg[cpk])
        CW = triton.cdiv(CW, chunk) * chunk
    # Built explicitly: F.pad with zero padding (CW == C, C a multiple of the chunk) returns a
    # clone that keeps w.t()'s strides, i.e. w's [C, NK] memory layout, not [NK, CW].
    wt = w.new_zeros(n + 2, CW)
    wt[:, :C] = w.t()
    return wt


def _splits(units: int, nblk: int, slots: int) -> int:
    """How many pieces to cut each of `units` work units (nblk blocks each) into, for `slots`
    resident CTAs: the smallest k (<= nblk, <= 64) whose waves times work per CTA,
    ceil(k * units / slots) / k, is within 5% of the best."""
    t = {k: triton.cdiv(k * units, slots) / k for k in range(1, min(nblk, 64) + 1)}
    best = min(t.values())
    return min(k for k, v in t.items() if v <= 1.05 * best)


_RESIDENT: dict = {}
_RESIDENT_ERR: dict = {}      # why resident_ctas fell back (diagnostics)


def resident_ctas(kernel, args, kwargs, fallback: int) -> int:
    """How many CTAs of `kernel`, compiled for these arguments (kernel.warmup: compiled, not
    launched), fit on one SM: registers (allocated per warp in 256s of 64K), shared memory (228
    KB per SM, 1 KB reserved per CTA) and 64 warps. `fallback` on the interpreter or when triton
    does not say. Cached per constexpr set, argument dtypes and device."""
    if interpreting():
        return fallback
    key = (kernel.fn.__name__, tuple(sorted(kwargs.items())),
           tuple(str(a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args),
           args[0].device.index)
    if key not in _RESIDENT:
        try:
            k = kernel.warmup(*args, grid=(1,), **kwargs)
            k._init_handles()
            warps = k.metadata.num_warps
            warp_regs = triton.cdiv(k.n_regs * 32, 256) * 256
            props = torch.cuda.get_device_properties(args[0].device)
            smem_sm = getattr(props, "shared_memory_per_multiprocessor", 233472)
            by_regs = 65536 // (warp_regs * warps)
            by_smem = smem_sm // (k.metadata.shared + 1024)
            _RESIDENT[key] = max(1, min(by_regs, by_smem, 64 // warps, 32))
        except Exception as exc:     # (an older or newer triton without these attributes)
            _RESIDENT[key] = fallback
            _RESIDENT_ERR[key] = f"{type(exc).__name__}: {exc}"
    return _RESIDENT[key]


def _launch_bwd_dx_mma(x, g, w, coef, dx, need_x, need_w, acc, cfg):
    """_bwd_dx_mma_kernel: dx into `dx` (added to what is there when acc: a site link's
    accumulator) and the dw partials; returns dw [C, NK] or None."""
    T, n, C = x.shape
    NK, NKC = n + 2, coef.shape[2]
    R = T * n
    bm = max(16, min(_pow2(cfg["b2_bm"]), _pow2(R)))
    bc = max(16, min(_pow2(cfg["b2_bc"]), _pow2(C)))
    ncb = triton.cdiv(C, bc)
    nblk = triton.cdiv(R, bm)
    kw = dict(N=n, NK=NK, NKC=NKC, KP=16, BM=bm, BC=bc, STAGES=cfg["b2_stages"],
              HAS_G=g is not None, WRITE_DX=need_x, WRITE_DW=need_w, ACC=acc,
              DW_BF16=cfg["b2_dw"] == "bf16" and x.dtype == torch.bfloat16,
              DOT_F32=interpreting(), EVEN_R=R % bm == 0, EVEN_C=C % bc == 0,
              num_warps=cfg["b2_warps"])
    # Row groups per column block: whole waves of the CTAs that fit on the GPU at once (b2_ctas
    # per SM, 0: as many as the compiled kernel's registers and shared memory allow)
    args = [x, g if g is not None else x, w, coef, dx if need_x else x, coef, R, C // 8, bm, ncb, 3]
    ctas = cfg["b2_ctas"] if cfg["b2_ctas"] > 0 else resident_ctas(_bwd_dx_mma_kernel, args, kw, 3)
    groups = _splits(ncb, nblk, ctas * _num_sms(x.device))
    gr = bm * triton.cdiv(nblk, groups)
    groups = triton.cdiv(R, gr)
    dwp = torch.empty(groups, C, NK, device=x.device, dtype=torch.float32) if need_w else None
    _bwd_dx_mma_kernel[(ncb * groups,)](
        x, g if g is not None else x, w, coef, dx if need_x else x, dwp if need_w else coef,
        R, C // 8, gr, ncb, groups, **kw)
    if not need_w:
        return None
    return dwp[0] if groups == 1 else dwp.sum(0)


class _HCPreFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, s, with_li, cfg, holder):
        T, n, C = x.shape
        save = any(ctx.needs_input_grad[:4])
        if cfg["fwd_impl"] == "gemm":
            out0, hpost, hres, z, r = _launch_fwd_gemm(x, w, b, s, with_li, save, cfg)
        else:
            out0, hpost, hres, z, r = _launch_fwd(x, _wt(w, T, n, C, cfg), b, s, with_li, save, cfg)
        if save:
            ctx.save_for_backward(x, w, b, s, z, r)
        ctx.with_li = with_li
        ctx.cfg = cfg
        ctx.holder = holder
        ctx.set_materialize_grads(False)
        return out0, hpost, hres

    @staticmethod
    def backward(ctx, g0, gpost, gres):
        x, w, b, s, z, r = ctx.saved_tensors
        need_x, need_w, need_b, need_s = ctx.needs_input_grad[:4]
        # First, on every path: F_post,res's share of dx (kernels/site_link.py), if a post put it
        # in this pre's link; the dx kernel adds into it in place.
        acc = site_link.accumulator(ctx.holder[0], x) if need_x else None
        cfg = ctx.cfg
        T, n, C = x.shape
        NP, NK = _pow2(n), n + 2
        NKC = (n + 4 + 3) // 4 * 4       # coef row: u_0..u_{NK-1}, h_pre, e (+ pad to 16 bytes)
        dev, f32 = x.device, torch.float32
        is_bf16 = x.dtype == torch.bfloat16
        x32 = x.view(torch.int32)
        has_g = ctx.with_li and g0 is not None
        gpre = g0.contiguous() if (not ctx.with_li and g0 is not None) else None
        gc = _int32_viewable(g0) if has_g else None
        g = gc.view(torch.int32) if has_g else None
        gpost = torch.zeros(T, n, device=dev, dtype=f32) if gpost is None else gpost.contiguous()
        gres = torch.zeros(T, n, n, device=dev, dtype=f32) if gres is None else gres.contiguous()

        # kernel 1: dh_pre, dz -> coef [T, n, NKC] = (r*dz, h_pre, e); ds / db_pre partials
        cp1 = _pow2(cfg["b1_cp"])
        warps1 = _warps(cfg["b1_warps"], C, cp1)
        BT1 = _bt(cfg["b1_bt"], cfg["b1_rows"], NP, T)
        blocks = triton.cdiv(T, BT1)
        GT1 = BT1 * triton.cdiv(blocks, max(1, cfg["b1_programs"]))
        P1 = triton.cdiv(T, GT1)
        PW = 2 + n
        coef = torch.empty(T, n, NKC, device=dev, dtype=f32)
        part = torch.empty(P1, PW, device=dev, dtype=f32)
        _bwd_coef_kernel[(P1,)](
            x32, g if has_g else x32, gpre if gpre is not None else gpost, gpost, gres, z, r, b, s,
            coef, part, T, C // 8, GT1,
            N=n, NP=NP, NK=NK, NKC=NKC, PW=PW, BT=BT1, NTH=32 * warps1, CP=cp1,
            IS_BF16=is_bf16, HAS_G=has_g, HAS_GPRE=gpre is not None,
            PREFETCH=bool(cfg["b1_prefetch"]), num_warps=warps1)

        dx = dw = db = ds = None
        if (need_x or need_w) and cfg["b2_impl"] == "mma":
            dx = (acc if acc is not None else torch.empty_like(x)) if need_x else None
            dw = _launch_bwd_dx_mma(x, gc, w, coef, dx, need_x, need_w, acc is not None, cfg)
        elif need_x or need_w:
            wt = _wt(w, T, n, C, cfg)
            cp2 = _pow2(cfg["b2_cp"])
            warps2 = _warps(cfg["b2_warps"], C, cp2)
            BT2 = _bt(cfg["b2_bt"], cfg["b2_rows"], NP, T)
            BC2 = 64 * warps2 * cp2
            ncb = triton.cdiv(C, BC2)
            groups = max(1, min(triton.cdiv(max(1, cfg["b2_programs"]), ncb), triton.cdiv(T, BT2)))
            GT2 = BT2 * triton.cdiv(triton.cdiv(T, groups), BT2)
            groups = triton.cdiv(T, GT2)
            dx = torch.empty_like(x) if need_x else None
            dwp = torch.empty(groups, NK, C, device=dev, dtype=f32) if need_w else None
            _bwd_dx_kernel[(ncb, groups)](
                x32, g if has_g else x32, wt, coef, dx if need_x else x, dwp if need_w else coef,
                T, C // 8, wt.shape[1], GT2,
                N=n, NP=NP, NK=NK, NKC=NKC, BT=BT2, NTH=32 * warps2, CP=cp2,
                IS_BF16=is_bf16, HAS_G=has_g, WRITE_DX=need_x, WRITE_DW=need_w,
                PREFETCH=bool(cfg["b2_prefetch"]), num_warps=warps2)
            if need_w:
                dw = dwp.sum(0).t().contiguous()
            if acc is not None:         # (the FMA kernel has no in-place accumulation)
                dx = acc.add_(dx)
        if need_b or need_s:
            # [ds (2) | db: pre, post, res]; part has a row per program, the others one per token
            sums = torch.cat([column_sums(part), column_sums(gpost, gres)])
            db = sums[2:] if need_b else None
            ds = sums[:2] if need_s else None
        return dx, dw, db, ds, None, None, None


def _int32_viewable(t: torch.Tensor) -> torch.Tensor:
    """Contiguous, starting on a 4-byte boundary (the kernels read pairs of 16-bit values as int32)."""
    t = t.contiguous()
    return t.clone() if t.storage_offset() % 2 else t


def _check(op, x, w, b, s):
    T, n, C = check_state(op, x)
    x = _int32_viewable(x)
    w = check_tensor(op, w, "w", (C, n + 2), torch.float32, x.device)
    b = check_tensor(op, b, "b", (n * n + 2 * n,), torch.float32, x.device)
    s = check_tensor(op, s, "s", (2,), torch.float32, x.device)
    return x, w, b, s


def _apply(x_user, x, w, b, s, with_li, config):
    holder = [None]
    out = _HCPreFn.apply(x, w, b, s, with_li, parse_config(config), holder)
    # a site link for the caller's x, carried by h_res: a post given this h_res and x hands its
    # dx to this pre's backward, which adds it in place (kernels/site_link.py)
    if x_user.requires_grad and torch.is_grad_enabled():
        holder[0] = site_link.attach(out[2], x_user)
    return out


def hc_coeffs(x, w, b, s, *, config=None):
    """(h_pre [T,n], h_post [T,n], h_res [T,n,n]) fp32, differentiable w.r.t. x, w, b, s."""
    x_user = x
    x, w, b, s = _check("hc_coeffs", x, w, b, s)
    if x.shape[0] == 0:
        return reference.hc_coeffs(x, w, b, s)
    return _apply(x_user, x, w, b, s, False, config)


def hc_pre(x, w, b, s, *, config=None):
    """(layer_input [T,C] x.dtype, h_post [T,n], h_res [T,n,n]), differentiable w.r.t. x, w, b, s."""
    x_user = x
    x, w, b, s = _check("hc_pre", x, w, b, s)
    if x.shape[0] == 0:
        return reference.hc_pre(x, w, b, s)
    return _apply(x_user, x, w, b, s, True, config)


__all__ = ["hc_coeffs", "hc_pre", "parse_config", "DEFAULT_CONFIG"]
