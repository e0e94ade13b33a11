"""Amax Gain Magnitude of composite h_res over depth, on fresh parameters and after a short
synthetic training run, for hc and mhc (residual trains beside them for the loss curve).

    python dev/stability.py --out DIR [--device cuda] [--C 512 --layers 8 --steps 300]

Writes DIR/stability.json (gains per depth, loss curves) and DIR/stability.md (tables); with
matplotlib, also DIR/stability.png (gains over depth and loss curves).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from suite.workloads import stability
from suite.workloads.model import ModelConfig, Transformer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default=None, help="default: triton on cuda, torch on cpu")
    p.add_argument("--C", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32")
    a = p.parse_args(argv)
    backend = a.backend or ("triton" if a.device == "cuda" else "torch")
    a.out.mkdir(parents=True, exist_ok=True)
    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
              "backend": backend, "paper_max_gain": stability.PAPER_MAX_GAIN, "methods": {}}
    for method in ("residual", "hc", "mhc"):
        cfg = ModelConfig(method=method, C=a.C, layers=a.layers, heads=a.heads, seq=a.seq,
                          vocab=a.vocab, n=a.n, backend="torch" if method == "residual" else backend,
                          dtype=a.dtype)
        model = Transformer(cfg, seed=0, device=a.device)
        probe = next(stability.markov_batches(a.vocab, 1, a.seq, 12345, a.device))[0]
        entry = {}
        if method != "residual":
            entry["fresh"] = stability.amax_gains(stability.h_res_per_site(model, probe), a.seq)
        t0 = time.time()
        entry["loss"] = stability.train(model, a.steps, a.batch, a.lr, seed=0, device=a.device)
        entry["train_s"] = round(time.time() - t0, 1)
        if method != "residual":
            entry["trained"] = stability.amax_gains(stability.h_res_per_site(model, probe), a.seq)
        result["methods"][method] = entry
        # Written after every method, so a run cut short by its time limit still leaves results.
        (a.out / "stability.json").write_text(json.dumps(result, indent=1))
        (a.out / "stability.md").write_text(markdown(result))
        print(f"{method}: loss {entry['loss'][0]:.3f} -> {entry['loss'][-1]:.3f} in "
              f"{entry['train_s']} s" + ("" if method == "residual" else
              f"; max composite gain fwd/bwd fresh {max(entry['fresh']['forward']):.3g}/"
              f"{max(entry['fresh']['backward']):.3g}, trained {max(entry['trained']['forward']):.3g}/"
              f"{max(entry['trained']['backward']):.3g}"), flush=True)
    (a.out / "stability.json").write_text(json.dumps(result, indent=1))
    (a.out / "stability.md").write_text(markdown(result))
    _plot(result, a.out / "stability.png")
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    m = result["methods"]
    lines = ["# Amax Gain Magnitude of composite h_res (sites counted separately)", "",
             (f"Config: {result['config']}, backend {result['backend']}. Paper (27B): HC up to "
             f"~{stability.PAPER_MAX_GAIN['hc']:.0f}, mHC at most ~{stability.PAPER_MAX_GAIN['mhc']}."),
             "", ("| depth (site) | HC fwd fresh | HC bwd fresh | HC fwd trained | HC bwd trained | "
             "mHC fwd fresh | mHC bwd fresh | mHC fwd trained | mHC bwd trained |"),
             "|---|---|---|---|---|---|---|---|---|"]
    depth = max((len(m[k]["fresh"]["forward"]) for k in ("hc", "mhc") if k in m), default=0)
    for k in range(depth):
        cells = [f"{m[meth][when][d][k]:.4g}" if meth in m else "not run"
                 for meth in ("hc", "mhc") for when in ("fresh", "trained")
                 for d in ("forward", "backward")]
        lines.append(f"| {k + 1} | " + " | ".join(cells) + " |")
    lines += ["", "Loss (every 10th step):", "", "| step | " + " | ".join(m) + " |",
              "|---|" + "---|" * len(m)]
    steps = len(next(iter(m.values()))["loss"])
    for s in list(range(0, steps, 10)) + ([steps - 1] if (steps - 1) % 10 else []):
        lines.append(f"| {s} | " + " | ".join(f"{m[k]['loss'][s]:.4f}" for k in m) + " |")
    return "\n".join(lines) + "\n"


def _plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: stability.md has the tables, no plot", flush=True)
        return
    m = result["methods"]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for i, d in enumerate(("forward", "backward")):
        for meth in ("hc", "mhc"):
            for when, ls in (("fresh", "--"), ("trained", "-")):
                ys = m[meth][when][d]
                ax[i].plot(range(1, len(ys) + 1), ys, ls, label=f"{meth} {when}")
        ax[i].set_yscale("log")
        ax[i].set_title(f"composite {d} gain (paper: HC ~3000, mHC <= 1.6)")
        ax[i].set_xlabel("site (attention and MLP counted separately)")
        ax[i].legend()
    for meth, e in m.items():
        ax[2].plot(e["loss"], label=meth)
    ax[2].set_title("training loss (synthetic Markov chain)")
    ax[2].set_xlabel("step")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
