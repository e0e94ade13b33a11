"""dev/tilelang_cluster_pre_probe.py: both x-once pre-forward kernels (version 2, one token
block per cluster, and version 3, persistent clusters) parse everywhere, and on an sm_90 GPU they
agree with the three-kernel forward, including a partial last token block."""
import subprocess
import sys

import pytest
import torch

from tests.script_module import DEV, load

SCRIPT = DEV / "tilelang_cluster_pre_probe.py"


@pytest.mark.parametrize("persistent", [False, True], ids=["v2", "persistent"])
def test_pre_probe_kernels_parse(persistent):
    probe = load("tilelang_cluster_pre_probe")
    func = (probe.build_persistent(2, 256, 4, 32, G=2) if persistent
            else probe.build(2, 256, 4, 32))
    assert "mhc_pre" in str(func.attrs["global_symbol"])


def test_pre_probe_rejects_a_slice_that_does_not_tile():
    with pytest.raises(AssertionError, match="multiple of 32"):
        load("tilelang_cluster_pre_probe").build(4, 264, 4, 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs an sm_90 GPU (thread-block clusters)")
@pytest.mark.parametrize("extra", [[], ["--persistent-G", "3"]], ids=["v2", "persistent"])
def test_pre_probe_matches_the_three_kernels_on_the_gpu(extra):
    run = subprocess.run([sys.executable, str(SCRIPT), "--n", "2", "--C", "1024", "--S", "8",
                          "--tokens", "1000", *extra], capture_output=True, text=True,
                         timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-1000:] + run.stderr[-2000:]
    assert "(ok)" in run.stdout
