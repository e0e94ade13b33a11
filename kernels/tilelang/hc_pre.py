"""HC pre (dynamic Hyper-Connections, MATH.md "HC") in TileLang: per-stream RMSNorm, tanh projections, F_pre.

    hc_coeffs(x, w, b, s) -> (h_pre [T,n], h_post [T,n], h_res [T,n,n]) fp32
    hc_pre(x, w, b, s)    -> (layer_input [T,C] x.dtype, h_post, h_res)
Same contract as kernels.reference / kernels.triton.hc_pre; differentiable w.r.t. x, w, b, s.
Per token: r[i] = sqrt(mean_c x[i]^2 + 1e-6), z[i, k] = (x[i] . w[:, k]) / r[i], p = tanh(z),
h_pre[i] = s_a p[i,0] + b_pre[i], h_post[i] = s_b p[i,1] + b_post[i], h_res[j,i] = s_a p[i,2+j] + b_res[j,i].

The norm and projections are mHC's row-norm GEMM with rows = (token, stream) pairs: x viewed as
[T*n, C] times w [C, n+2] (kernels/tilelang/gemm_kernels.py: build_gemm_norm(hc=True), wgmma with w
split into hi + lo in x's dtype, 64 rows = 16 tokens (n = 4) per CTA). Forward, three kernels:
  row-norm GEMM -> z [T, n, n+2], r [T, n];
  _build_coef (one thread per token): tanh, scales and biases -> h_pre, h_post, h_res;
  mhc_pre.build_apply: layer_input = sum_i h_pre[i] x[i].
Backward: stream_kernels.build_dhpre (dh_pre = g_li . x[i]), _build_coef_bwd (one thread per token:
dz = (1 - p^2) dp, du = dz / r, coef = -(dz . z) / (r^2 C), per-token ds), then the row GEMM
kernel mhc_pre.build_dx_dphi(hc=True): dx = du @ w^T + coef * x + h_pre * g_li and dw = x^T @ du
(the tile kernel when n divides its 64-row block: 16 tokens of 4 streams, a [16, br] g_li tile).
db is a torch sum of the upstream gradients. Site link as in mhc_pre: hc_pre / hc_coeffs tag h_res,
a fused post of the same x hands its dx over, and the dx kernel adds into it in place.
HBM bytes per token, like mHC's: x read twice in each direction (the floor reads it once).
"""
import functools

import torch

from kernels import site_link
from kernels.colsum import column_sums
from kernels.tilelang import mhc_pre as _m
from kernels.tilelang.common import TOK_PER_CTA, check_state, check_tensor, compile_kernel, on_device

NT = TOK_PER_CTA


@functools.cache
def _build_coef(n: int, cpu: bool):
    import tilelang.language as T

    NK = n + 2
    Tn = T.dynamic("T")
    f32 = "float32"

    @T.macro
    def token(t, z, b, s, h_pre, h_post, h_res):
        if t < Tn:
            for i in T.unroll(n):
                h_pre[t, i] = s[0] * T.tanh(z[t, i, 0]) + b[i]
                h_post[t, i] = s[1] * T.tanh(z[t, i, 1]) + b[n + i]
                for j in T.unroll(n):
                    h_res[t, j, i] = s[0] * T.tanh(z[t, i, 2 + j]) + b[2 * n + j * n + i]

    @T.prim_func
    def hc_coef(z: T.Tensor((Tn, n, NK), f32), b: T.Tensor((n * n + 2 * n,), f32),
                s: T.Tensor((2,), f32), h_pre: T.Tensor((Tn, n), f32),
                h_post: T.Tensor((Tn, n), f32), h_res: T.Tensor((Tn, n, n), f32)):
        with T.Kernel(T.ceildiv(Tn, NT), threads=1 if cpu else NT) as bx:
            if cpu:
                for tx in T.serial(NT):
                    token(bx * NT + tx, z, b, s, h_pre, h_post, h_res)
            else:
                token(bx * NT + T.get_thread_binding(0), z, b, s, h_pre, h_post, h_res)

    return compile_kernel(hc_coef, cpu)


@functools.cache
def _build_coef_bwd(n: int, C: int, cpu: bool):
    import tilelang.language as T

    NK = n + 2
    Tn = T.dynamic("T")
    f32 = "float32"

    @T.macro
    def token(t, z, r, s, dh, gq, gr, du, coef, ds, v):
        if t < Tn:
            v[2] = 0.0
            v[3] = 0.0
            for i in T.unroll(n):
                v[4] = 0.0          # sum_k dz * z for row i
                for k in T.unroll(NK):
                    v[0] = T.tanh(z[t, i, k])
                    if k == 0:
                        v[1] = s[0] * dh[t, i]
                        v[2] += dh[t, i] * v[0]
                    elif k == 1:
                        v[1] = s[1] * gq[t, i]
                        v[3] += gq[t, i] * v[0]
                    else:
                        v[1] = s[0] * gr[t, k - 2, i]
                        v[2] += gr[t, k - 2, i] * v[0]
                    v[1] = v[1] * (1.0 - v[0] * v[0])
                    du[t, i, k] = v[1] / r[t, i]
                    v[4] += v[1] * z[t, i, k]
                coef[t, i] = -v[4] / (r[t, i] * r[t, i] * C)
            ds[t, 0] = v[2]
            ds[t, 1] = v[3]

    @T.prim_func
    def hc_coef_bwd(z: T.Tensor((Tn, n, NK), f32), r: T.Tensor((Tn, n), f32),
                    s: T.Tensor((2,), f32), dh: T.Tensor((Tn, n), f32), gq: T.Tensor((Tn, n), f32),
                    gr: T.Tensor((Tn, n, n), f32), du: T.Tensor((Tn, n, NK), f32),
                    coef: T.Tensor((Tn, n), f32), ds: T.Tensor((Tn, 2), f32)):
        with T.Kernel(T.ceildiv(Tn, NT), threads=1 if cpu else NT) as bx:
            v = T.alloc_local((5,), f32)
            if cpu:
                for tx in T.serial(NT):
                    token(bx * NT + tx, z, r, s, dh, gq, gr, du, coef, ds, v)
            else:
                token(bx * NT + T.get_thread_binding(0), z, r, s, dh, gq, gr, du, coef, ds, v)

    return compile_kernel(hc_coef_bwd, cpu)


# ====================================================================== host side
def coeffs_from_z(z, b, s):
    """Kernel _build_coef on z [T, n, n+2]: (h_pre, h_post, h_res)."""
    T_, n, _ = z.shape
    f32 = torch.float32
    h_pre = torch.empty(T_, n, device=z.device, dtype=f32)
    h_post = torch.empty(T_, n, device=z.device, dtype=f32)
    h_res = torch.empty(T_, n, n, device=z.device, dtype=f32)
    if T_:
        kern = _build_coef(n, z.device.type == "cpu")
        with on_device(z):
            kern(z, b, s, h_pre, h_post, h_res)
    return h_pre, h_post, h_res


def coeffs_backward(z, r, s, dh, g_post, g_res, C):
    """Kernel _build_coef_bwd: (du [T, n, n+2], coef [T, n], ds per token [T, 2])."""
    T_, n, _ = z.shape
    du = torch.empty_like(z)
    coef = torch.empty_like(r)
    ds = torch.empty(T_, 2, device=z.device, dtype=torch.float32)
    if T_:
        kern = _build_coef_bwd(n, C, z.device.type == "cpu")
        with on_device(z):
            kern(z, r, s, dh, g_post, g_res, du, coef, ds)
    return du, coef, ds


def _check(op, x, w, b, s):
    _, n, C = check_state(op, x)
    if x.device.type != "cuda":
        raise ValueError(f"{op}: the HC GEMM kernels (wgmma, TMA) run on CUDA only, x is on {x.device}")
    x = x.contiguous()
    w = check_tensor(op, w, "w", (C, n + 2), torch.float32, x.device)
    b = check_tensor(op, b, "b", (n * n + 2 * n,), torch.float32, x.device)
    s = check_tensor(op, s, "s", (2,), torch.float32, x.device)
    return x, w, b, s


def _forward(x, w, b, s, with_li):
    T_, n, _ = x.shape
    z, r = _m.gemm_norm(x, w, hc=True)
    z = z.view(T_, n, n + 2)
    r = r.view(T_, n)
    h_pre, h_post, h_res = coeffs_from_z(z, b, s)
    li = _m.apply_pre(x, h_pre) if with_li else None
    return li, h_pre, h_post, h_res, z, r


def _backward(x, w, s, z, r, h_pre, g_first, g_post, g_res, with_li, needs, acc=None):
    """acc: post's x gradient handed over through the site link (added into dx in place)."""
    T_, n, C = x.shape
    f32 = torch.float32
    dev = x.device
    zeros = functools.partial(torch.zeros, device=dev, dtype=f32)
    g_li = None
    if with_li:
        g_li = g_first.to(x.dtype).contiguous() if g_first is not None else None
        dh = _m.dh_pre_of(x, g_li) if g_li is not None else zeros(T_, n)
    else:
        dh = g_first.to(f32).contiguous() if g_first is not None else zeros(T_, n)
    gq = g_post.to(f32).contiguous() if g_post is not None else zeros(T_, n)
    gr = g_res.to(f32).contiguous() if g_res is not None else zeros(T_, n, n)
    du, coef, ds = coeffs_backward(z, r, s, dh, gq, gr, C)
    need_x, need_w, need_b, need_s = needs
    dx = dw = db = dsum = None
    if need_x or need_w:
        if T_:
            dx, dw = _m.dx_dphi(x, w, du.view(T_ * n, n + 2), coef.view(-1), h_pre, g_li, need_w,
                                hc=True, acc=acc if need_x else None)
        else:
            dx = acc if acc is not None else torch.zeros_like(x)
            dw = torch.zeros_like(w)
    if need_b or need_s:
        sums = column_sums(ds, dh, gq, gr)         # [dsum (2) | db: pre, post, res]
        db = sums[2:] if need_b else None
        dsum = sums[:2] if need_s else None
    return (dx if need_x else None), (dw if need_w else None), db, dsum


class _HcFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, s, with_li, holder):
        li, h_pre, h_post, h_res, z, r = _forward(x, w, b, s, with_li)
        ctx.set_materialize_grads(False)
        ctx.with_li, ctx.holder = with_li, holder
        ctx.save_for_backward(x, w, s, z, r, h_pre)
        return (li if with_li else h_pre), h_post, h_res

    @staticmethod
    def backward(ctx, g_first, g_post, g_res):
        needs = tuple(ctx.needs_input_grad[:4])
        x, w, s, z, r, h_pre = ctx.saved_tensors
        # post's x gradient from a linked post (kernels/site_link.py), taken on every path
        acc = site_link.accumulator(ctx.holder[0], x) if needs[0] else None
        if (g_first is None and g_post is None and g_res is None) or not any(needs):
            return acc, None, None, None, None, None
        return (*_backward(x, w, s, z, r, h_pre, g_first, g_post, g_res, ctx.with_li, needs, acc),
                None, None)


def _apply(x_user, x, w, b, s, with_li):
    """_HcFn with h_res linked to the caller's x (kernels/site_link.py) when a gradient may be
    needed: a fused post of that x and h_res then hands its dx to this backward."""
    holder = [None]
    out = _HcFn.apply(x, w, b, s, with_li, holder)
    if torch.is_grad_enabled() and x_user.requires_grad:
        holder[0] = site_link.attach(out[2], x_user)
    return out


def hc_coeffs(x, w, b, s):
    """(h_pre [T,n], h_post [T,n], h_res [T,n,n]) in fp32, h_res indexed [token, dst, src]."""
    xc, w, b, s = _check("hc_coeffs", x, w, b, s)
    return _apply(x, xc, w, b, s, False)


def hc_pre(x, w, b, s):
    """(layer_input [T,C] in x.dtype, h_post [T,n] fp32, h_res [T,n,n] fp32)."""
    xc, w, b, s = _check("hc_pre", x, w, b, s)
    return _apply(x, xc, w, b, s, True)
