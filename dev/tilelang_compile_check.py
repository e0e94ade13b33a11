"""Compiles every TileLang mHC and HC coefficient kernel and the chain boundary's kernels for sm_90a on a machine without a GPU (needs nvcc),
so lowering and nvcc errors show before a device session.

Usage: PYTHONPATH=<tilelang site> python dev/tilelang_compile_check.py [n C] ...   (default 4 264 8 4096)
Prints ok / FAILED with the last error line per kernel; exit 1 if any failed.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HCBENCH_TILELANG_TARGET", '{"kind": "cuda", "arch": "sm_90a"}')


def main() -> int:
    from kernels.tilelang import hc_pre as h
    from kernels.tilelang import mhc_pre as m
    from kernels.tilelang import post_coeffs_kernels as pc
    from kernels.tilelang.post_coeffs import minb_of
    args = [int(a) for a in sys.argv[1:]] or [4, 264, 8, 4096]
    bad = 0
    for n, C in zip(args[::2], args[1::2]):
        builds = {
            "gemm_norm": lambda n=n, C=C: m.build_gemm_norm(n, C, "bfloat16"),
            "dx_dphi": lambda n=n, C=C: m.build_dx_dphi(n, C, "bfloat16", 2, True),
            "dx_dphi (coeffs)": lambda n=n, C=C: m.build_dx_dphi(n, C, "float16", 1, False),
            "coef": lambda n=n, C=C: m.build_coef(n, 20, False),
            "coef_bwd": lambda n=n, C=C: m.build_coef_bwd(n, C, 20, False),
            "apply": lambda n=n, C=C: m.build_apply(n, C, "bfloat16", False),
            "dhpre": lambda n=n, C=C: m.build_dhpre(n, C, "bfloat16", False),
            "hc gemm_norm": lambda n=n, C=C: m.build_gemm_norm(n, C, "bfloat16", True),
            "hc dx_dw": lambda n=n, C=C: m.build_dx_dphi(n, C, "bfloat16", 2, True, True),
            "hc dx_dw (coeffs)": lambda n=n, C=C: m.build_dx_dphi(n, C, "float16", 1, False, True),
            "hc coef": lambda n=n, C=C: h._build_coef(n, False),
            "hc coef_bwd": lambda n=n, C=C: h._build_coef_bwd(n, C, False),
            "boundary fwd": lambda n=n, C=C: pc.build_fwd(n, C, "bfloat16", 128, 512, False,
                                                          minb_of(n)[0]),
            "boundary finish": lambda n=n, C=C: pc.build_finish(n, C, 8, 20, False),
            "boundary bwd": lambda n=n, C=C: pc.build_bwd(n, C, "bfloat16", 128, 512, True, True,
                                                          True, True, True, False, minb_of(n)[1]),
            "boundary dphi": lambda n=n, C=C: pc.build_dphi(n, C, "bfloat16", 128, 64, False),
        }
        for name, build in builds.items():
            try:
                build()
                print(f"ok     n={n} C={C} {name}", flush=True)
            except Exception as exc:  # noqa: BLE001 (reported, counted)
                bad += 1
                last = str(exc).strip().splitlines()
                print(f"FAILED n={n} C={C} {name}: {last[-1] if last else exc!r}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
