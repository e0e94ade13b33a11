"""Running cases: the runner and its case lifecycle (skip, gate, time, record or failed), the
correctness gate, the distributed protocol across ranks, the traffic pass, prewarm, and the
per-kernel profile of a site."""
