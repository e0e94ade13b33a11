"""The single-GPU stand-in pipeline stage: whatever streams the overlap techniques put the
copies and the post kernels on, one step gives the same loss-free stage gradients as the plain
inline schedule (a missing stream wait would read a buffer before its copy lands). On a CPU the
techniques change only the order of posting; on a GPU (marked gpu) they use real streams."""
import pytest
import torch

from suite.workloads.dist import pipeline as pp
from suite.workloads.model import ModelConfig, Transformer

MB = 2


def _stage_grads(device, overlap, method, recompute):
    n = 1 if method == "residual" else 4      # the residual stream is one stream wide
    cfg = ModelConfig(method=method, C=32, layers=2, heads=2, seq=8, vocab=32, n=n,
                      dtype="fp32", recompute=recompute, L_r=1)
    model = Transformer(cfg, seed=5, device=device)
    model.randomise_connections(5)
    if "priority" in overlap and torch.device(device).type == "cuda":
        pp.post_on_stream(model, torch.cuda.Stream(priority=-1))
    stage = pp.Stage(model, 0, cfg.layers, first=False, last=False, recompute=recompute,
                     L_r=1, microbatches=MB)
    link = pp.CopyLink((2 * cfg.seq, cfg.n, cfg.C), torch.float32, device, MB,
                       "stream" in overlap, seed=9)
    for buf in link.act_buf + link.grad_buf:     # a receive read before its copy lands: NaN
        buf.fill_(float("nan"))
    pp.run_1f1b(pp.schedule(1, 3, MB), stage, link, MB, overlap)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    grads = {k: p.grad.clone() for k, p in stage.named_parameters().items()}
    sent = [h.clone() for h in link.host_out]
    return grads, sent


# Loose enough for fp32 attention backward kernels that accumulate with atomics; a receive
# read before its copy lands reads NaN.
def _compare(device, method, recompute):
    base, base_sent = _stage_grads(device, set(), method, recompute)
    for overlap in ({"stream"}, {"stream", "priority"}, {"stream", "priority", "early_recompute"}):
        got, sent = _stage_grads(device, overlap, method, recompute)
        assert got.keys() == base.keys()
        for k in base:
            torch.testing.assert_close(got[k], base[k], rtol=1e-4, atol=1e-5, msg=k)
        for a, b in zip(sent, base_sent):       # what went out: activations and gradients
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method, recompute", [("mhc", "mhc"), ("residual", "none")])
def test_standin_stage_same_gradients_with_every_technique_cpu(method, recompute):
    _compare("cpu", method, recompute)


@pytest.mark.gpu
@pytest.mark.parametrize("method, recompute", [("mhc", "mhc"), ("residual", "none")])
def test_standin_stage_same_gradients_with_every_technique_gpu(method, recompute):
    _compare("cuda", method, recompute)


def test_data_parallel_rows_show_busbw_as_nccl_tests_defines_it():
    from suite.report import distributed as dist_report
    rec = {"status": "ok", "case": {"parallel": "data", "method": "mhc", "n": 4, "C": 64, "T": 32,
                                    "device": "cuda",
                                    "layers": 2, "gpus": 4, "microbatches": None, "recompute": "none",
                                    "overlap": "none"},
           "t_step_ms": 10.0, "t_compute_ms": 8.0, "t_comm_ms": 2.0, "exposed_comm_ms": 1.0,
           "overlap_efficiency": 0.5, "allreduce_bytes": 2**30, "algbw_gbps": 100.0,
           "busbw_gbps": 150.0, "gbps": 100.0, "link": "nvlink"}
    (row,) = dist_report.overlap_rows([rec])
    header = dist_report.OVERLAP_HEADER
    assert row[header.index("algbw GB/s")] == "100.0" and row[header.index("busbw GB/s")] == "150.0"


def test_priority_runs_every_boundary_unfused_so_each_post_can_move():
    cfg = ModelConfig(method="mhc", C=32, layers=2, heads=2, seq=8, vocab=32, n=4, dtype="fp32")
    model = Transformer(cfg, seed=5, device="cpu")
    assert all(s.boundary_fusion for layer in model.layers for s in (layer.attn, layer.mlp))
    pp.post_on_stream(model, stream=None)       # only wraps: no stream is touched until a call
    assert not any(s.boundary_fusion for layer in model.layers for s in (layer.attn, layer.mlp))
