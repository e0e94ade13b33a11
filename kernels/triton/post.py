"""F_post,res for HC and mHC: x_next[t, i] = sum_j h_res[t, i, j] x[t, j] + h_post[t, i] f[t].

Shapes (MATH.md): x [T, n, C] bf16/fp16, f [T, C] same dtype, h_post [T, n] fp32,
h_res [T, n, n] fp32 indexed [token, dst, src]. fp32 accumulation; x_next in x's dtype.

Forward, one pass (kernel `post_fwd_kernel`):
  grid = ceil(T / BT) * ceil(C / BLOCK_C) programs, one (BT tokens, C-chunk) each, consecutive
  programs walk the same tokens' chunks. A program loads x as one [BT, NP, BLOCK_C / VEC, VEC]
  tile (NP = n rounded up to a power of two, padded rows and tail tokens masked; a thread holds
  one 16-byte vector of every row) and f's chunks, accumulates acc[i] = h_post[i] f + sum_j h_res[i, j] x[j] in fp32 and stores it:
  per token it reads (n+1)C elements and writes nC, the minimum.

Backward, one pass (kernel `post_bwd_kernel`), g = dL/dx_next:
  dx[j]        = sum_i h_res[i, j] g[i]   (state dtype)
  df           = sum_i h_post[i] g[i]     (state dtype)
  dh_post[i]   = sum_c g[i, c] f[c]       (fp32)
  dh_res[i, j] = sum_c g[i, c] x[j, c]    (fp32)
  grid = T * SPLIT programs; a program owns one token and a contiguous run of C-chunks. Per chunk
  it first loads g's and x's [n, BLOCK_C] tiles and f's chunk (all loads before any store), then
  writes the dx tile and the df chunk. Tiles are shaped [NP, BLOCK_C / VEC, VEC] so that a thread
  holds one VEC-element vector of every row: sums over rows (dx, df, picking row i of g) and the
  first stage of the sums over C stay in the thread. The C-reductions dh_post and dh_res are
  carried as per-thread partials across the chunk loop and reduced across threads once, after
  it: no shuffles or barriers inside the loop. SPLIT = 1 (the usual case: T fills the GPU) writes
  the fp32 coefficient gradients directly; SPLIT > 1 (few tokens: C is split so that there are
  about 4 programs per SM) writes fp32 partials [T, SPLIT, n (n)] that a tiny torch sum reduces.
  Bytes per token: read (2n+1)C, write (n+1)C elements (+ n + n^2 fp32), the floor. Gradients
  not asked for (ctx.needs_input_grad) are neither computed nor their inputs read.

Defaults (measured with dev/tune_post.py on an H100, see _default_block_c): forward BLOCK_C =
the smallest of 256 / 512 / 1024 dividing C (256 at 2560, 4096 and 7168), VEC = 8 (16 bytes) and
num_warps = BLOCK_C / (32 VEC). Backward (BWD_BLOCK_C): BLOCK_C = 128, VEC = 4, one warp at
n <= 4 (H100, bf16, T = 16384: 6-7% faster than 256 / VEC 8 at C = 2560, 4096 and 7168,
dev/logs/tuning-20261124-h100/post_bwd_vec_probe.txt); n > 4: VEC = 4, BLOCK_C <= 512, for
registers. Compiled for sm_90 with triton 3.9 (ptxas, no GPU): forward 48 registers at n = 4, all
row accesses 128-bit; backward no barrier inside the chunk loop. TileLang's post forward (96-97%
of copy) loads through 16-byte ld.global.nc without a pipeline; here the same loads via inline PTX,
streaming cache hints and chunks loaded in groups all stayed below the cp.async loop below
(H100: dev/logs/tuning-20261124-h100/post_fwd_nc_probe.txt), so none is kept. Nsight Compute at
C = 2560 (ncu_post_fwd_2560.csv there): both kernels move exactly the floor bytes, but this loop
(72 registers with its 3 stages) keeps DRAM at 61% of peak against TileLang's 87%, and its warps
seldom wait on memory (long-scoreboard stalls 3% of active cycles against 89%): the limit is
inside the pipelined loop, not the traffic. Its stall breakdown (ncu_post_fwd_2560_stalls.csv):
every x and f byte goes through shared memory (cp.async in, ld.shared out), which keeps the
L1 / shared-memory pipes 94% busy; a warp issues once per 12.1 cycles, 3.9 of them short-scoreboard
(shared-memory) waits, and a scheduler has an eligible warp only 56% of cycles.

Offsets: per-token bases are int64 (T*n*C may exceed 2^31), in-token offsets int32.
C is a compile-time constant (one compile per width; it lets every row load be a 16-byte vector
and drops masks when BLOCK_C divides C).

Tuning: `post(..., fwd=..., bwd=...)` takes a dict (or "key=value,..." string) with keys
block_c, num_warps, vec (both), bt, loop, persistent (forward only), split (backward only) and
num_stages (backward; forward with loop=1); the environment variables HCBENCH_POST_FWD /
HCBENCH_POST_BWD give defaults in the same string form. Unset keys use `fwd_config` /
`bwd_config`'s heuristics. dev/tune_post.py times the alternatives.

Forward loop variant (`post_fwd_loop_kernel`, fwd "loop=1"; the default from LOOP_MIN_TOKENS =
2048 tokens, measured on an H100 at T = 16384, see LOOP_STAGES): one program per token looping
over all of C, as the TileLang kernel does. It reads h_post[t] and h_res[t] once per token instead
of once per chunk, keeps the [NP, BLOCK_C / VEC, VEC] tiles and 16-byte row vectors above, peels a
masked tail chunk off when BLOCK_C does not divide C, and pipelines the chunk loop with
`tl.range(num_stages=...)`. Keys: block_c (default 512 or 256, whichever divides C), num_warps
(default block_c / (32 vec), at most 8), num_stages (default 3; >= 2 streams chunks through shared
memory with 16-byte cp.async, 1 loads straight into registers; ignored without loop=1, since it is
also a backward key), persistent (default 0; P >= 1 launches min(T, P * SM count) programs
striding over the tokens; slower on the H100). bt must stay 1 and persistent needs loop=1; loop=0
selects the chunked kernel at any T.
"""
from __future__ import annotations

import functools
import os

import torch
import triton

from kernels import site_link
from kernels.triton.common import check_state, check_tensor
from kernels.triton.post_bwd import post_bwd_kernel
from kernels.triton.post_fwd import post_fwd_kernel, post_fwd_loop_kernel

OP = "post"


# ------------------------------------------------------------------------------------ configs
def _pow2(v: int) -> int:
    return triton.next_power_of_2(max(int(v), 1))


def _default_block_c(C: int) -> int:
    """Smallest of 256/512/1024 that divides C (no masked tail), else C rounded up, capped at 1024.

    256 columns (one warp) beat 512 and 1024 forward and backward at C = 2560, 4096 and 7168 on an
    H100 (dev/tune_post.py, 2026-11-23): many small programs keep more bytes in flight per SM.
    The backward at n <= 4 goes smaller still (BWD_BLOCK_C: 128 columns with VEC = 4).
    """
    cap = min(1024, _pow2(C))
    for b in (256, 512, 1024):
        if b <= cap and C % b == 0:
            return b
    return cap


# Tokens per forward program. 2, 4 and 8 (with 1-8 warps, block_c 256 or 512) were all 15-40%
# slower than 1 on an H100 at n = 4 (dev/logs/tuning-20261123-h100/pass2/tune_post.log).
FWD_TOKENS = 1


# Forward variant loop=1: one token per program looping over C, the default from LOOP_MIN_TOKENS
# tokens (H100, n = 4, T = 16384, dev/tune_post.py, dev/logs/tuning-20261123-h100/pass4:
# block_c 512 with 3 stages reached 85.6 / 89.2 / 91.8% of the copy rate at C = 2560 / 4096 /
# 7168 against 85.3 / 87.7 / 88.0% for the chunked kernel). Below that a program per token leaves
# SMs idle, and the chunked kernel (C split over programs) is kept.
# Pipeline depth of its chunk loop: num_stages > 1 streams chunks through shared memory with
# 16-byte cp.async (Triton's software pipeliner), num_stages = 1 keeps plain 16-byte loads.
BWD_BLOCK_C = 128     # backward chunk at n <= 4 (with VEC = 4: one warp per token)
LOOP_STAGES = 3
LOOP_MIN_TOKENS = 2048

_KEYS = ("block_c", "num_warps", "num_stages", "split", "vec", "bt", "loop", "persistent")


@functools.lru_cache(maxsize=None)
def _parse(spec: str) -> dict:
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, _, val = item.partition("=")
        key = key.strip()
        if key not in _KEYS or not val.strip():
            raise ValueError(f"{OP}: bad config item {item!r} (keys: block_c, num_warps, vec, "
                             "num_stages; forward also bt, loop, persistent; backward also split)")
        try:
            out[key] = int(val)
        except ValueError:
            raise ValueError(f"{OP}: bad config item {item!r} (values are integers)") from None
    return out


def _as_dict(cfg) -> dict:
    if cfg is None:
        return {}
    if isinstance(cfg, str):
        return _parse(cfg)
    return dict(cfg)


def _check_block_c(block_c: int) -> None:
    if block_c < 8 or block_c & (block_c - 1):
        raise ValueError(f"{OP}: block_c must be a power of two >= 8, got {block_c}")


def _vec(d: dict, block_c: int) -> int:
    # Elements of each row per thread: 8 (16 bytes) unless given (the backward passes 4: three
    # [NP, VEC] tiles per thread); never more than the chunk.
    vec = min(block_c, int(d.get("vec") or 8))
    if vec < 1 or vec & (vec - 1):
        raise ValueError(f"{OP}: vec must be a power of two, got {vec}")
    return vec


def _loop_block_c(C: int) -> int:
    """512 or 256, whichever divides C first, else C rounded up to a power of two, capped at 512.

    512 beat 1024 and 2048 at every width measured (same H100 run as LOOP_STAGES), and a divisor
    of C leaves no masked tail chunk: 2560, 4096 and 7168 -> 512.
    """
    cap = min(512, _pow2(C))
    for b in (512, 256):
        if b <= cap and C % b == 0:
            return b
    return cap


def fwd_config(n: int, C: int, cfg=None, T: int = 0) -> dict:
    """Resolved forward launch parameters: block_c, vec, bt (tokens per program), num_warps,
    loop (0: one program per chunk; 1: one program per token looping over C; default 1 from
    LOOP_MIN_TOKENS tokens), persistent (loop only: 0, or programs per SM) and num_stages (loop
    only; None without the loop)."""
    d = {**_as_dict(os.environ.get("HCBENCH_POST_FWD")), **_as_dict(cfg)}
    loop = int(d["loop"]) if d.get("loop") is not None else int(T >= LOOP_MIN_TOKENS)
    if loop not in (0, 1):
        raise ValueError(f"{OP}: loop must be 0 or 1, got {loop}")
    persistent = int(d.get("persistent") or 0)
    if persistent < 0:
        raise ValueError(f"{OP}: persistent must be 0 (off) or programs per SM >= 1, got {persistent}")
    if persistent and not loop:
        raise ValueError(f"{OP}: persistent={persistent} needs loop=1")
    block_c = int(d.get("block_c") or (_loop_block_c(C) if loop else _default_block_c(C)))
    _check_block_c(block_c)
    vec = _vec(d, block_c)
    bt = int(d.get("bt") or (1 if loop else FWD_TOKENS))
    if bt < 1 or bt & (bt - 1):
        raise ValueError(f"{OP}: bt must be a power of two >= 1, got {bt}")
    if loop and bt != 1:
        raise ValueError(f"{OP}: bt must be 1 with loop=1 (one token per program), got {bt}")
    num_stages = None
    if loop:
        # num_stages is also a backward key; without the loop the forward has no loop to
        # pipeline and ignores it, so one config string can still serve both kernels.
        num_stages = LOOP_STAGES if d.get("num_stages") is None else int(d["num_stages"])
        if num_stages < 1:
            raise ValueError(f"{OP}: num_stages must be >= 1 (1: no pipelining), got {num_stages}")
    return {"block_c": block_c, "vec": vec, "bt": bt,
            "num_warps": int(d.get("num_warps") or max(1, min(8, bt * block_c // (32 * vec)))),
            "loop": loop, "persistent": persistent, "num_stages": num_stages}


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def bwd_config(T: int, n: int, C: int, device: torch.device, cfg=None) -> dict:
    """Resolved backward launch parameters: block_c, vec, num_warps, num_stages, split (+ cps)."""
    d = {**_as_dict(os.environ.get("HCBENCH_POST_BWD")), **_as_dict(cfg)}
    # n > 4: 8 rows of g and x per thread; smaller chunks keep two CTAs per SM (243 registers).
    block_c = int(d.get("block_c") or (min(BWD_BLOCK_C, _pow2(C)) if n <= 4
                                        else min(512, _default_block_c(C))))
    _check_block_c(block_c)
    vec = _vec({"vec": d.get("vec") or 4}, block_c)
    warps = int(d.get("num_warps") or max(1, min(8, block_c // (32 * vec))))
    ncb = triton.cdiv(C, block_c)
    split = d.get("split")
    if not split:
        # Enough programs to fill the GPU (about 4 per SM); split C only when T is small.
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else 4
        split = 1 if T >= 4 * sms else min(ncb, triton.cdiv(4 * sms, max(T, 1)))
    split = max(1, min(int(split), ncb))
    cps = triton.cdiv(ncb, split)
    split = triton.cdiv(ncb, cps)          # no empty programs
    return {"block_c": block_c, "vec": vec, "num_warps": warps,
            "num_stages": int(d.get("num_stages") or 1), "split": split, "cps": cps}


# ------------------------------------------------------------------------------------ launchers
def post_forward(x, f, h_post, h_res, cfg=None):
    """Forward kernel only, on validated contiguous inputs."""
    T, n, C = x.shape
    out = torch.empty_like(x)
    if T == 0:
        return out
    p = fwd_config(n, C, cfg, T)
    if p["loop"]:
        grid = T
        if p["persistent"]:
            sms = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device()) \
                if x.device.type == "cuda" else 4
            grid = min(T, p["persistent"] * sms)
        post_fwd_loop_kernel[(grid,)](
            x, f, h_post, h_res, out, T,
            N=n, NP=_pow2(n), C=C, BLOCK_C=p["block_c"], VEC=p["vec"], NUM_STAGES=p["num_stages"],
            PERSISTENT=bool(p["persistent"]), num_warps=p["num_warps"])
        return out
    ncb = triton.cdiv(C, p["block_c"])
    post_fwd_kernel[(triton.cdiv(T, p["bt"]) * ncb,)](
        x, f, h_post, h_res, out, T,
        N=n, NP=_pow2(n), C=C, BLOCK_C=p["block_c"], VEC=p["vec"], NCB=ncb,
        EVEN_C=(C % p["block_c"] == 0), BT=p["bt"], EVEN_T=(T % p["bt"] == 0),
        num_warps=p["num_warps"])
    return out


def post_backward(g, x, f, h_post, h_res, need=(True, True, True, True), cfg=None):
    """Backward kernel only: returns (dx, df, dh_post, dh_res), None where need[k] is False."""
    T, n, C = x.shape
    need_dx, need_df, need_dhp, need_dhr = (bool(v) for v in need)
    dx = torch.empty_like(x) if need_dx else None
    df = torch.empty_like(f) if need_df else None
    if not any(need):
        return dx, df, None, None
    p = bwd_config(T, n, C, x.device, cfg)
    split = p["split"]
    dhp = torch.empty((T, split, n), device=x.device, dtype=torch.float32) if need_dhp else None
    dhr = torch.empty((T, split, n, n), device=x.device, dtype=torch.float32) if need_dhr else None
    if T > 0:
        dummy = g  # any pointer of the right kind for arguments a variant does not touch
        even = C % p["block_c"] == 0 and p["cps"] * split == triton.cdiv(C, p["block_c"])
        post_bwd_kernel[(T * split,)](
            g, x, f, h_post, h_res,
            dx if need_dx else dummy, df if need_df else dummy,
            dhp if need_dhp else h_post, dhr if need_dhr else h_res,
            N=n, NP=_pow2(n), C=C, BLOCK_C=p["block_c"], VEC=p["vec"], SPLIT=split, CPS=p["cps"],
            EVEN_C=even, NUM_STAGES=p["num_stages"],
            NEED_DX=need_dx, NEED_DF=need_df, NEED_DHP=need_dhp, NEED_DHR=need_dhr,
            num_warps=p["num_warps"])
    if need_dhp:
        dhp = dhp[:, 0] if split == 1 else dhp.sum(dim=1)
    if need_dhr:
        dhr = dhr[:, 0] if split == 1 else dhr.sum(dim=1)
    return dx, df, dhp, dhr


class _Post(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, f, h_post, h_res, fwd_cfg, bwd_cfg, link):
        ctx.save_for_backward(x, f, h_post, h_res)
        ctx.bwd_cfg, ctx.link = bwd_cfg, link
        return post_forward(x, f, h_post, h_res, fwd_cfg)

    @staticmethod
    def backward(ctx, g):
        x, f, h_post, h_res = ctx.saved_tensors
        need = ctx.needs_input_grad[:4]
        if g.dtype != x.dtype:
            g = g.to(x.dtype)
        dx, df, dhp, dhr = post_backward(g.contiguous(), x, f, h_post, h_res, need, ctx.bwd_cfg)
        dx = site_link.hand_over(ctx, ctx.link, dx, 3)   # to the linked pre's backward, if any
        return dx, df, dhp, dhr, None, None, None


def post(x: torch.Tensor, f: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor,
         *, fwd=None, bwd=None) -> torch.Tensor:
    """x_next = h_res @ x + h_post * f per token (F_post,res, MATH.md), differentiable.

    x [T, n, C] bf16/fp16 (n in 1..8, C a multiple of 8), f [T, C] x's dtype,
    h_post [T, n] fp32, h_res [T, n, n] fp32 [token, dst, src]. Returns [T, n, C] in x's dtype.
    fwd / bwd: optional launch overrides (see module docstring). When h_res comes from a fused
    pre of the same x (kernels/site_link.py), the x gradient goes to that pre's backward.
    """
    T, n, C = check_state(OP, x, "x")
    link = site_link.claim(h_res, x)
    x = x.contiguous()
    f = check_tensor(OP, f, "f", (T, C), x.dtype, x.device)
    h_post = check_tensor(OP, h_post, "h_post", (T, n), torch.float32, x.device)
    h_res = check_tensor(OP, h_res, "h_res", (T, n, n), torch.float32, x.device)
    return _Post.apply(x, f, h_post, h_res, fwd, bwd, link)
