"""Op chain as a case: its fields, inputs, gate and floor (the kernels are tested in
tests/triton/test_chain.py and tests/test_chain_reference.py)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import kernels
from kernels import reference as ref
from suite.analysis import cost
from suite.core.scenario import Case, ScenarioError, load, normalise
from suite.run import check as checking


def _case(**kw) -> Case:
    base = dict(method="mhc", C=24, T=37, n=3, op="chain", dtype="fp32", device="cpu")
    return normalise(Case(**{**base, **kw}))


def test_a_chain_has_four_sites_unless_told_and_other_ops_keep_their_ids(tmp_path):
    assert _case().sites == 4 and _case(sites=6).sites == 6
    site = normalise(Case(method="mhc", C=24, T=37, n=3, device="cpu"))
    assert site.sites is None
    # the field is new: a site case written before it has the id it had
    before = {k: v for k, v in dataclasses.asdict(site).items() if k != "sites"}
    assert site.case_id == normalise(Case(**before)).case_id
    assert _case(sites=4).case_id != _case(sites=5).case_id


def test_sites_on_another_op_is_one_line(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ndefaults: {method: mhc, C: 64, T: 8}\nsweep: {op: [site], sites: [4]}\n")
    with pytest.raises(ScenarioError) as exc:
        load(path)
    assert "sites: means nothing for op 'site'; allowed with op chain" in str(exc.value)
    path.write_text("name: s\ndefaults: {method: mhc, C: 64, T: 8, op: chain}\nsweep: {sites: [1]}\n")
    with pytest.raises(ScenarioError) as exc:
        load(path)
    assert "sites[0]: 1 is not allowed; allowed: integers 2..64" in str(exc.value)


@pytest.mark.parametrize("method", ["residual", "hc", "mhc"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_the_reference_chain_passes_the_gate(method, mode):
    result = checking.check(kernels.get(method, "torch"), _case(method=method, mode=mode), "cpu")
    assert result["passed"], result
    names = set(result["errors"])
    assert {"layer_input0", "layer_input3", "x_next"} <= names
    if mode == "fwd+bwd":
        assert {"d_x", "d_f0", "d_f3"} <= names


def test_a_chain_whose_boundary_takes_the_wrong_site_parameters_fails_the_gate():
    good = kernels.get("mhc", "torch")
    assert good.post_coeffs is not None

    def stale(x, f, h_post, h_res, phi, b, alpha, sinkhorn_iters=20):
        # the boundary uses site l+1's parameters with the mixing logits negated: a mismatched
        # post and pre that still produces well-formed coefficients
        return ref.mhc_post_coeffs(x, f, h_post, h_res, phi, -b, alpha, sinkhorn_iters)
    bad = dataclasses.replace(good, post_coeffs=stale)
    result = checking.check(bad, _case(mode="fwd"), "cpu")
    assert not result["passed"]
    assert result["errors"]["layer_input0"] <= result["tols"]["layer_input0"]   # before the boundary
    assert result["errors"]["layer_input1"] > result["tols"]["layer_input1"]    # after it


def test_the_chain_floor_per_site_tends_to_3n_plus_2_c_forward():
    n, C, s = 4, 4096, 2
    per_site = {}
    for L in (4, 64):
        c = cost.case_cost("mhc", "chain", "fwd", n, C, 1, "bf16", 20, L)
        per_site[L] = (c.read + c.write - L * cost.param_bytes("mhc", n, C)) / L
    coef = 2 * (n * n + 2 * n) * 4
    assert per_site[64] == pytest.approx((3 * n + 2) * C * s + coef + n * C * s / 64)
    assert per_site[4] > per_site[64]
    T, L = 16384, 64
    fb = cost.case_cost("mhc", "chain", "fwd+bwd", n, C, T, "bf16", 20, L)
    state = (fb.total - 3 * L * cost.param_bytes("mhc", n, C)) / (L * T)
    assert state == pytest.approx((8 * n + 6) * C * s, rel=0.01)    # MATH.md: 38C at n = 4


def test_stored_states_round_value_and_gradient_to_the_dtype():
    from kernels.chain import as_stored
    x = (torch.tensor([1.0 + 2 ** -10, 3.0], dtype=torch.float64)).requires_grad_()
    y = as_stored(x, torch.bfloat16)
    assert y.tolist() == [1.0, 3.0]
    y.backward(torch.tensor([1.0 + 2 ** -10, 0.5], dtype=torch.float64))
    assert x.grad.tolist() == [1.0, 0.5]


def test_a_bf16_chain_gate_allows_what_the_dtype_does_and_no_more():
    """The eager reference in bf16 passes with each tolerance at least its dtype's; a boundary with
    mismatched parameters still fails by far."""
    case = _case(dtype="bf16", C=64, T=128, n=4, mode="fwd+bwd")
    good = kernels.get("mhc", "torch")
    result = checking.check(good, case, "cpu")
    assert result["passed"], result["worst"]
    assert set(result["dtype_effect"]) == set(result["errors"])
    assert all(result["tols"][k] >= 0.01 for k in result["tols"])
    assert any(result["tols"][k] > 0.01 for k in result["tols"])     # some gradient needed more

    def stale(x, f, h_post, h_res, phi, b, alpha, sinkhorn_iters=20):
        return ref.mhc_post_coeffs(x, f, h_post, h_res, phi, -b, alpha, sinkhorn_iters)
    bad = checking.check(dataclasses.replace(good, post_coeffs=stale), case, "cpu")
    assert not bad["passed"] and bad["errors"]["layer_input1"] > 5 * bad["tols"]["layer_input1"]
