"""The block length of recompute: Eq. 20 of the mHC paper (section 4.3.2), counted in sites.

A case's default L_r comes from here (suite.core.scenario), and so does the memory the
verdict sets beside the measured one (suite.analysis.overhead); suite.workloads.recompute runs
the blocks. A site is one connection around one sublayer: a transformer layer has two.

The memory model (Eq. 20), per token in state elements, with L and L_r counted in sites:
resident n*C*ceil(L/L_r) for the block inputs (`retained_model`), transient (n+2)*C*L_r while one
block is recomputed (`transient_model`); their sum (`memory_model`) is least near
L_r* = sqrt(n*L/(n+2)) (`lr_star`; integer argmin `best_lr`). Counted per site, the formula's
optimum matches what was measured on GPU by activation memory, "2 layers at L = 12 layers and
3 layers at L = 30 layers": 12 layers are 24 sites, best_lr(4, 24) = 4 sites = 2 layers
(sqrt(16) = 4 exactly); 30 layers are 60 sites, best_lr(4, 60) = 6 sites = 3 layers
(sqrt(40) = 6.32). Counted per layer it would have said 3 and 5 layers. `default_lr(n, layers)`
is the default block length, in sites, of a model of `layers` transformer layers.
"""
from __future__ import annotations

import math

RECOMPUTE = ("none", "mhc", "full")


def lr_star(n: int, L: int) -> float:
    """The paper's continuous optimum of the block length, sqrt(n L / (n + 2)), L in sites."""
    return math.sqrt(n * L / (n + 2))


def retained_model(n: int, C: int, L: int, L_r: int, f_outputs: bool = False) -> int:
    """Eq. 20's resident elements per token: one block input x_l0 (n C) per block of L_r sites,
    n C ceil(L/L_r). With f_outputs, also the sublayer outputs Table 3 stores for every site
    (C L): Eq. 20 leaves them out because they do not depend on L_r.
    RetainedBytes.x0_bytes == retained_model(...) * T * element size, and RetainedBytes.total ==
    retained_model(..., f_outputs=True) * T * element size (tests/test_recompute.py)."""
    return n * C * math.ceil(L / L_r) + (C * L if f_outputs else 0)


def transient_model(n: int, C: int, L: int, L_r: int) -> int:
    """Eq. 20's transient elements per token while one block is recomputed: (n+2) C per site of
    the block (x_l, H_pre x_l and the pre-norm inside F); a block never holds more than the L
    sites there are, so L_r counts as min(L_r, L)."""
    return (n + 2) * C * min(L_r, L)


def memory_model(n: int, C: int, L: int, L_r: int) -> int:
    """Eq. 20's activation elements per token: n C ceil(L/L_r) + (n+2) C L_r (L, L_r in sites)."""
    return retained_model(n, C, L, L_r) + transient_model(n, C, L, L_r)


def best_lr(n: int, L: int) -> int:
    """The integer L_r in 1..L that minimises memory_model (C cancels); ties go to the smaller.
    L in sites: best_lr(4, 24) = 4, best_lr(4, 60) = 6."""
    return min(range(1, L + 1), key=lambda r: (memory_model(n, 1, L, r), r))


def default_lr(n: int, layers: int) -> int:
    """The default block length, in sites, of a model of `layers` transformer layers (2 sites
    each): best_lr(n, 2 * layers). default_lr(4, 12) = 4, default_lr(4, 30) = 6."""
    return best_lr(n, 2 * layers)
