#!/usr/bin/env bash
# scenarios/kernels.yaml with every backend (torch, compile, triton, tilelang, liger, te) in one new run
# folder, on an offline GPU machine, in one command of at most BUDGET_S (default 560 s):
#   OUT=/some/dir bash dev/gpu_kernels.sh [harness args, e.g. --only C=4096]
# carrying .tilelang-site.tar.xz and .whl (liger-kernel, transformer-engine). dev/gpu_resume.sh does the work: set-up,
# every case's compile caches filled in parallel (TileLang, torch.compile, Liger's mHC, which
# compiles for minutes per width and token count: it unrolls its K loop and makes T a compile-time
# constant), then the timed run; the run's files go to $OUT, also when the time limit cuts it
# short. Finish the rest with dev/gpu_resume.sh on the committed folder (carry a packed
# .triton-cache.tar.xz from an earlier call to skip Liger's compiles: see gpu_resume.sh).
exec bash "$(dirname "$0")/gpu_resume.sh" scenarios/kernels.yaml new "$@"
