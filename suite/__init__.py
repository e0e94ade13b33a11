"""The benchmark suite: scenarios in, checked and timed records out, reports from records."""
