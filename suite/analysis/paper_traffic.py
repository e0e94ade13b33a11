"""The mHC paper's own per-token traffic figures (Table 2 and section 4.3.1), for the cases they describe.

The paper counts elements per token for one site, forward only, F's own I/O excluded. Bytes here
use MATH.md's convention: C-sized terms at the state dtype's size, coefficient terms (n, n^2, 2n)
at 4 bytes (fp32). Which figure a case is compared with:

    residual site   Table 2 residual total           read 2C                     write C
    hc site         Table 2 HC total (unfused)       read (5n+1)C + n^2 + 2n     write (3n+1)C + n^2 + 2n
    hc post         Table 2 rows apply H_post + apply H_res + residual merge
                                                     read (3n+1)C + n + n^2      write 3nC
    mhc post        section 4.3.1, fused F_post,res  read (n+1)C                 write nC

The whole mHC site has no total in the paper (PAPERS.md B.3 derives one, which is not the paper's):
it is compared with MATH.md's floor, i.e. the record's analytic `bytes`, and gets no paper figure.
Backward passes are not in the paper either.
"""
from __future__ import annotations

from dataclasses import dataclass

from suite.analysis.cost import COEF
from suite.core.dtypes import ELEMENT_BYTES


@dataclass(frozen=True)
class PaperFigure:
    read: int          # bytes for the whole case (all T tokens)
    write: int
    source: str        # where in the paper, and the formula in elements per token

    @property
    def total(self) -> int:
        return self.read + self.write


def paper_figure(method: str, op: str, mode: str, n: int, C: int, T: int,
                 dtype: str) -> PaperFigure | None:
    """The paper's bytes for this case, or None where the paper gives no figure."""
    if mode != "fwd" or dtype not in ELEMENT_BYTES:
        return None
    s = ELEMENT_BYTES[dtype]

    def bytes_of(c_elems: int, coef_elems: int) -> int:
        return (c_elems * C * s + coef_elems * COEF) * T

    k = n * n + 2 * n
    if method == "residual" and op == "site":
        return PaperFigure(bytes_of(2, 0), bytes_of(1, 0), "Table 2 residual: 2C / C")
    if method == "hc" and op == "site":
        return PaperFigure(bytes_of(5 * n + 1, k), bytes_of(3 * n + 1, k),
                           "Table 2 HC total: (5n+1)C+n^2+2n / (3n+1)C+n^2+2n")
    if method == "hc" and op == "post":
        return PaperFigure(bytes_of(3 * n + 1, n + n * n), bytes_of(3 * n, 0),
                           "Table 2 HC H_post+H_res+merge: (3n+1)C+n+n^2 / 3nC")
    if method == "mhc" and op == "post":
        return PaperFigure(bytes_of(n + 1, 0), bytes_of(n, 0),
                           "sec. 4.3.1 fused F_post,res: (n+1)C / nC")
    return None
