"""Reports, from records only: the terminal table and report.md, comparisons, the distributed
sections, and the index of committed runs in docs/results.md."""
