"""What one case executes: a connection op (scope site), a model or a training step, recompute,
stability, and the distributed workloads (dist/). Imports the layers below it, never the runner."""
