"""Analytic bytes and FLOPs of one case, from MATH.md's traffic table.

Bytes are the floor: what any implementation must move through device memory, each input read
once and each output written once (state elements at the state dtype's size, coefficients at 4
bytes, parameters once per call). GB/s and % of copy rate are therefore "fraction of the
roofline", comparable across backends. Per token, forward (K = n*n + 2n coefficients):

    op       read                          write
    coeffs   nC                            K*4 B
    pre      nC                            C + (n + n*n)*4 B     (coefficients fused with F_pre)
    post     (n+1)C + (n + n*n)*4 B        nC
    site     pre + post = (2n+1)C + ...    (n+1)C + ...
    residual site: read 2C, write C (x + f; pre is a view)

Backward floors (fwd+bwd adds them to the forward):
    post     read x, f, g (2n+1)C + coeffs     write dx, df (n+1)C + dcoeffs
    pre      read x, g_li (n+1)C + dcoeffs     write dx nC
    coeffs   read x nC + dcoeffs               write dx nC
    site     read x, f, g_xn, g_li (2n+2)C + dcoeffs    write dx, df (n+1)C + dcoeffs
    residual site: read g_xn, g_li 2C, write dx, df 2C
FLOPs count a multiply-add as 2: the coefficient GEMM, the norm, the mixing and F_pre;
Sinkhorn adds 4*n*n per iteration. Element-wise gates are ignored (they are noise here).
"""
from __future__ import annotations

from dataclasses import dataclass

from suite.core.dtypes import ELEMENT_BYTES

COEF = 4


@dataclass(frozen=True)
class Cost:
    read: int
    write: int
    flops: int

    @property
    def total(self) -> int:
        return self.read + self.write

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.read + other.read, self.write + other.write, self.flops + other.flops)


def case_cost(method: str, op: str, mode: str, n: int, C: int, T: int, dtype: str,
              sinkhorn_iters: int | None = 20, sites: int | None = None) -> Cost:
    """The floor of one call of the case; for op chain, of the whole chain of `sites` sites."""
    if op == "chain":
        return chain_cost(method, mode, n, C, T, dtype, sinkhorn_iters or 0, sites)
    fwd = forward_cost(method, op, n, C, T, dtype, sinkhorn_iters or 0)
    if mode == "fwd":
        return fwd
    return fwd + backward_cost(method, op, n, C, T, dtype, sinkhorn_iters or 0)


def chain_cost(method, mode, n, C, T, dtype, iters, sites) -> Cost:
    """L consecutive sites, each boundary fused (MATH.md, "A chain of sites"). Per site forward:
    read (2n+1)C, write (n+1)C, i.e. (3n+2)C, plus the coefficients (n^2 + 2n fp32) written
    once and read once; the first site also reads x0 for its coefficients (nC). Per site
    backward: read (4n+3)C, write (n+1)C, plus the coefficients and their gradients; the chain
    also reads the gradient of x_L and writes that of x0 (nC each). Parameters and their
    gradients once per site. The residual's chain is L residual sites."""
    L = sites
    if method == "residual":
        one = forward_cost(method, "site", n, C, T, dtype, iters)
        if mode != "fwd":
            one = one + backward_cost(method, "site", n, C, T, dtype, iters)
        return Cost(one.read * L, one.write * L, one.flops * L)
    s = ELEMENT_BYTES[dtype]
    coef = (n * n + 2 * n) * COEF
    params = param_bytes(method, n, C)
    flops = _coeff_flops(method, n, C, iters) + 2 * n * C + 2 * n * (n + 1) * C
    cost = Cost((n * C * s + L * ((2 * n + 1) * C * s + coef)) * T + L * params,
                L * ((n + 1) * C * s + coef) * T, L * flops * T)
    if mode == "fwd":
        return cost
    return cost + Cost((n * C * s + L * ((4 * n + 3) * C * s + 2 * coef)) * T + L * params,
                       (n * C * s + L * ((n + 1) * C * s + coef)) * T + L * params, 2 * L * flops * T)


def forward_cost(method, op, n, C, T, dtype, iters) -> Cost:
    s = ELEMENT_BYTES[dtype]
    if method == "residual":
        if op == "pre":
            return Cost(0, 0, 0)
        return Cost(2 * C * s * T, C * s * T, C * T)
    k = n * n + 2 * n
    mix = (n + n * n) * COEF            # h_post and h_res per token
    params = param_bytes(method, n, C)
    coeff_flops = _coeff_flops(method, n, C, iters)
    pre_flops = 2 * n * C
    post_flops = 2 * n * (n + 1) * C
    if op == "coeffs":
        return Cost(n * C * s * T + params, k * COEF * T, coeff_flops * T)
    if op == "pre":
        return Cost(n * C * s * T + params, (C * s + mix) * T, (coeff_flops + pre_flops) * T)
    if op == "post":
        return Cost(((n + 1) * C * s + mix) * T, n * C * s * T, post_flops * T)
    if op == "site":
        return Cost(((2 * n + 1) * C * s + mix) * T + params, ((n + 1) * C * s + mix) * T,
                    (coeff_flops + pre_flops + post_flops) * T)
    raise ValueError(f"unknown op {op!r}")


def backward_cost(method, op, n, C, T, dtype, iters) -> Cost:
    s = ELEMENT_BYTES[dtype]
    if method == "residual":
        if op == "pre":
            return Cost(C * s * T, C * s * T, 0)
        return Cost(2 * C * s * T if op == "site" else C * s * T,
                    2 * C * s * T, C * T)
    k = n * n + 2 * n
    mix = (n + n * n) * COEF
    params = param_bytes(method, n, C)
    # Backward of the coefficient pass: dx and dparam products, each the size of the forward GEMM.
    coeff_flops = 2 * _coeff_flops(method, n, C, iters)
    pre_flops = 4 * n * C
    post_flops = 4 * n * (n + 1) * C
    if op == "coeffs":
        return Cost((n * C * s + k * COEF) * T + params, n * C * s * T + params, coeff_flops * T)
    if op == "pre":
        return Cost(((n + 1) * C * s + mix) * T + params, n * C * s * T + params,
                    (coeff_flops + pre_flops) * T)
    if op == "post":
        return Cost(((2 * n + 1) * C * s + mix) * T, ((n + 1) * C * s + mix) * T, post_flops * T)
    if op == "site":
        return Cost(((2 * n + 2) * C * s + mix) * T + params, ((n + 1) * C * s + mix) * T + params,
                    (coeff_flops + pre_flops + post_flops) * T)
    raise ValueError(f"unknown op {op!r}")


def param_bytes(method: str, n: int, C: int) -> int:
    k = n * n + 2 * n
    if method == "mhc":
        return (n * C * k + k + 3) * COEF
    if method == "hc":
        return (C * (n + 2) + k + 2) * COEF
    return 0


def _coeff_flops(method: str, n: int, C: int, iters: int) -> int:
    k = n * n + 2 * n
    if method == "mhc":
        return 2 * n * C * k + 2 * n * C + 4 * n * n * iters
    # hc: per-stream norm and n x (n+2) projections of length C
    return 2 * n * C * (n + 2) + 2 * n * C
