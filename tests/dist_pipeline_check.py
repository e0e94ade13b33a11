"""Run under torchrun (tests/test_dist.py): one 1F1B step of the pipeline in fp32 for several
stage counts, recompute modes and overlap techniques; rank 0 compares the loss and every
gradient with one step of the same model in one process and writes the errors as JSON."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from suite.workloads.dist import launch
from suite.workloads.dist import pipeline as pp
from suite.workloads.model import ModelConfig, Transformer

SEQ, MB, BATCH = 8, 4, 2          # per micro-batch: BATCH sequences of SEQ tokens


def config(method, recompute):
    return ModelConfig(method=method, C=32, layers=4, heads=2, seq=SEQ, vocab=64, n=4,
                       dtype="fp32", recompute=recompute, L_r=2 if recompute == "mhc" else 1)


def data(seed):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 64, (MB * BATCH, SEQ), generator=gen)
    return tokens, torch.roll(tokens, -1, dims=1)


def pipeline_grads(cfg, P, overlap, groups, seed):
    rank = dist.get_rank()
    if rank >= P:
        return None
    model = Transformer(cfg, seed=seed)
    model.randomise_connections(seed)
    lo, hi = pp.split_layers(cfg.layers, P)[rank]
    stage = pp.Stage(model, lo, hi, first=rank == 0, last=rank == P - 1,
                     recompute=cfg.recompute, L_r=cfg.L_r, microbatches=MB)
    link = pp.DistLink(list(range(P)), rank, groups, (BATCH * SEQ, model.cfg.streams, cfg.C),
                       torch.float32, "cpu", MB)
    tokens, targets = data(seed)
    pp.run_1f1b(pp.schedule(rank, P, MB), stage, link, MB, overlap,
                list(tokens.chunk(MB)), list(targets.chunk(MB)))
    grads = {k: p.grad.clone() for k, p in stage.named_parameters().items()
             if p.grad is not None}
    loss = float(sum(stage.losses)) if stage.last else None
    return {"grads": grads, "loss": loss, "names": list(stage.named_parameters())}


def single_grads(cfg, seed):
    model = Transformer(ModelConfig(**{**cfg.__dict__, "recompute": "none"}), seed=seed)
    model.randomise_connections(seed)
    tokens, targets = data(seed)
    loss = model(tokens, targets)
    loss.backward()
    return float(loss), {k: p.grad for k, p in model.named_parameters()}


def main(out):
    world = launch.from_env()
    launch.init(world, timeout=60)
    results = []
    group_sets = {P: pp.boundary_groups(list(range(P))) for P in (2, world.size)}
    cases = [("mhc", "none", 2, set()), ("mhc", "mhc", world.size, {"stream", "early_recompute"}),
             ("hc", "full", world.size, {"early_recompute"}), ("residual", "none", world.size,
                                                               {"stream"}),
             ("mhc", "mhc", 2, set())]
    for i, (method, recompute, P, overlap) in enumerate(cases):
        cfg = config(method, recompute)
        part = pipeline_grads(cfg, P, overlap, group_sets[P], seed=100 + i)
        parts = [None] * world.size
        dist.all_gather_object(parts, part)
        if world.rank != 0:
            continue
        ref_loss, ref = single_grads(cfg, seed=100 + i)
        got, owners = {}, {}
        for r, p in enumerate(parts):
            if p is None:
                continue
            got.update(p["grads"])
            for name in p["names"]:
                owners[name] = owners.get(name, 0) + 1
        loss = next(p["loss"] for p in parts if p and p["loss"] is not None)
        errs = {k: float((got[k] - g).norm() / g.norm().clamp_min(1e-30)) if k in got else None
                for k, g in ref.items()}
        results.append({"method": method, "recompute": recompute, "P": P,
                        "overlap": sorted(overlap), "loss": loss, "ref_loss": ref_loss,
                        "grad_errors": errs, "owned_once": all(v == 1 for v in owners.values())
                        and set(owners) == set(ref)})
    if world.rank == 0:
        Path(out).write_text(json.dumps(results))
    launch.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
