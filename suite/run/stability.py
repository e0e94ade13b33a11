"""Scope stability in the runner: one training run per case, through the one case lifecycle.

The runner (suite.run.runner) hands each stability case to `measure` inside lifecycle.attempt, so a
case this machine cannot run is skipped with the reason, an exception fails it with one line, and
the record has the one schema. Before training, the case's backend and wiring pass the fp64 model
gate of scope model (suite.workloads.steps.check, at its small gate shape); then the model trains
(suite.workloads.stability) and the record gets:
- `stability`: the curves, gains, spikes and corpus (docs/records.md lists the fields);
- `time_ms`: wall clock per training step, one sample per stretch between checkpoints (evaluation
  and gain measurement excluded), `time_kind` saying so, `tokens_per_s`, `model_flops` and
  `tflops` of one step, `peak_mem_bytes` of the whole run; on a GPU, `telemetry` and `flags`.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from suite.analysis import predict
from suite.core.scenario import Case
from suite.measure import telemetry
from suite.measure.timing import Timing
from suite.run import lifecycle
from suite.workloads import stability, steps

TIME_KIND = "wall clock per training step (mean over each stretch between checkpoints)"


def gate_case(case: Case) -> Case:
    """The scope-model case of the same model, for the model gate (one step, no training)."""
    return replace(case, scope="model", steps=None, lr=None, init=None)


def measure(session, case: Case, record: dict) -> None:
    """Gate, train and fill `record` (runs inside lifecycle.attempt)."""
    if not lifecycle.gate(record, steps.check(gate_case(case), case.device)):
        return
    cuda = case.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with telemetry.Sampler(session.gpu_uuid if cuda else None) as sampler:
        result = stability.train(case, case.device)
    timing = Timing(samples=result["step_ms"])
    record["time_ms"] = timing.summary()
    record["time_kind"] = TIME_KIND
    record["telemetry"] = sampler.summary()
    record["flags"], record["flag_notes"] = telemetry.flags(record["telemetry"], record["time_ms"])
    record["peak_mem_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
    record["tokens_per_s"] = case.T / (timing.median * 1e-3)
    record["model_flops"] = predict.model_flops(gate_case(case))
    record["tflops"] = record["model_flops"] / (timing.median * 1e-3) / 1e12
    record["stability"] = result["stability"]
