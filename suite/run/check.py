"""The correctness gate: a backend is compared with the fp64 reference before it is timed.

Fresh inputs (a seed the timed run does not use), every output and, in fwd+bwd mode, every
gradient; error is norm-wise relative (suite.core.tolerance), each output against the tolerance of
the output (forward coefficients: fp32, which allows tf32; everything else: the case dtype),
and an output of the wrong dtype fails.

A chain (op chain) carries its state from site to site, and every backend stores that state (and,
unless its boundary is fused, the state's gradient) in the case dtype. Its coefficient gradients
are sums over tokens that cancel, so one such rounding can move d_alpha or d_b by more than the
bf16 tolerance for any backend, the eager reference in bf16 included. The gate measures that
effect: the fp64 reference once more with the states and their gradients rounded to the case
dtype between sites (kernels/chain.py, stored_dtype), and each chain output's tolerance is the
larger of its dtype's and DTYPE_EFFECT_FACTOR (3) times the difference that rounding alone makes
(`dtype_effect` in the result). A backend is still held to the unrounded fp64 reference. Where the
fp64 reference of the full case would not fit in device memory, the check runs on fewer tokens and
says how many.
"""
from __future__ import annotations

import torch

import kernels
from suite.core.dtypes import TORCH_DTYPES
from suite.core.scenario import Case
from suite.core.tolerance import rel_err, tolerance
from suite.workloads import workload

CHECK_SEED_OFFSET = 1_000_003
# Outputs in the state dtype; every other output (coefficients, parameter gradients) must be fp32
# (MATH.md). The forward coefficients are held to the fp32 tolerance (it allows tf32 products):
# a truncated Sinkhorn or a skipped norm shows there. Gradients derive from state-dtype upstream
# gradients and keep the state tolerance.
STATE_OUTPUTS = ("layer_input", "x_next", "d_x", "d_f")
COEFFICIENTS = ("h_pre", "h_post", "h_res")
# Bytes of device memory per state element that the fp64 reference plus the backend need,
# generously (inputs, upcast copies, outputs, gradients, autograd temporaries).
BYTES_PER_ELEMENT = 160
# A chain output may differ from the fp64 reference by this many times what storing its states in
# the case dtype alone does to it (see the module docstring).
DTYPE_EFFECT_FACTOR = 3.0


def check_tokens(case: Case, device: str) -> int:
    """Tokens of the correctness check: all of the case's when they fit, else the largest power of
    two that does. Free memory differs a little between processes on a card; a power of two nearly
    always absorbs that, so a backend that compiles per token count (Liger-Kernel's mHC makes T a
    compile-time constant) meets one shape, which suite.run.prewarm can compile ahead."""
    if device != "cuda":
        return case.T
    free, _ = torch.cuda.mem_get_info()
    per_token = case.n * case.C * BYTES_PER_ELEMENT * (case.sites or 1 if case.op == "chain" else 1)
    fit = int(0.6 * free) // per_token
    if fit >= case.T:
        return case.T
    return 1 << max(0, fit.bit_length() - 1)


def check(ops: kernels.Ops, case: Case, device: str) -> dict:
    T = check_tokens(case, device)
    inputs = workload.make_inputs(case, device, case.seed + CHECK_SEED_OFFSET, T=T)
    got = workload.run(ops, case, inputs)
    ref_ops = ops.reference or kernels.get(case.method, "torch")
    state = TORCH_DTYPES[case.dtype]
    ref = workload.run(ref_ops, case, workload.upcast(inputs))
    effect = {}
    if case.op == "chain" and state not in (torch.float32, torch.float64):
        stored = workload.run(ref_ops, case, workload.upcast(inputs), stored_dtype=state)
        effect = {name: rel_err(stored[name], want) for name, want in ref.items()}
        del stored
    errors, tols, wrong_dtype = {}, {}, []
    for name, want in ref.items():
        # a chain numbers its outputs per site (layer_input0, d_f2): the kind is the name's stem
        expected = state if name.rstrip("0123456789") in STATE_OUTPUTS else torch.float32
        tols[name] = max(tolerance(torch.float32 if name in COEFFICIENTS else state),
                         DTYPE_EFFECT_FACTOR * effect.get(name, 0.0))
        if name not in got:
            errors[name] = float("inf")          # a gradient the backend did not produce
            continue
        errors[name] = rel_err(got[name], want)
        if got[name].dtype != expected:
            wrong_dtype.append(f"{name} is {got[name].dtype}, expected {expected}")
            errors[name] = float("inf")
    del got, ref, inputs
    # The worst output is the one furthest past (or closest to) its own tolerance.
    worst = max(errors, key=lambda k: errors[k] / tols[k])
    return {"max_rel_err": errors[worst], "tol": tols[worst],
            "passed": all(errors[k] <= tols[k] for k in errors),
            "worst": worst, "T": T, "errors": errors, "tols": tols, "wrong_dtype": wrong_dtype,
            "reference": ops.deviation or "MATH.md",
            **({"dtype_effect": effect} if effect else {})}
