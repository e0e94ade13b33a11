"""How the suite measures: the one timer, the environment and its provenance, the GPU's
telemetry, Nsight Compute's CSV and per-kernel profiles. Imports suite.core only."""
