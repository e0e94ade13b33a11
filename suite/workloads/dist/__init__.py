"""The distributed workloads: who this rank is (launch), the pipeline stages and schedule, and
what one rank does for a p2p, pipeline or data-parallel case (bench)."""
