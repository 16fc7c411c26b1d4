"""Seeded, nested draws of labeled units (scenes or tiles) for label-efficiency runs.

Draw ``d`` orders the whole pool once; its ``k`` units are the first ``k`` of that order, so the
draws are **nested**: the scene of ``k=1`` is inside the ``k=5`` set of the same draw, and a curve
over ``k`` compares label budgets on the same scenes, not on new luck at every ``k``. The draws of
one ``k`` are different subsets while the pool has them (independent draws gave ``k=1`` the same
dubai scene twice in three draws): each draw starts with a different unit, and an order whose
prefix repeats an earlier draw's subset is drawn again (a bounded number of times).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

_REDRAWS = 200  # orders tried per draw before a repeated prefix is accepted


def draw_order(pool: list[str], draw: int, seed: int) -> list[str]:
    """The order of the whole ``pool`` for draw ``draw`` (reproducible; independent of the pool's
    listing order)."""
    return list(_orders(tuple(sorted(pool)), draw, seed)[draw])


def draw_units(pool: list[str], k: int, draw: int, seed: int) -> list[str]:
    """The ``k`` units of draw ``draw``: the first ``k`` of :func:`draw_order`, sorted."""
    if not 1 <= k <= len(pool):
        raise ValueError(f"k={k} must be in [1, {len(pool)}]")
    return sorted(draw_order(pool, draw, seed)[:k])


@lru_cache(maxsize=64)
def _orders(members: tuple[str, ...], upto: int, seed: int) -> list[tuple[str, ...]]:
    n = len(members)
    firsts = np.random.default_rng([seed, n]).permutation(n)
    orders: list[tuple[str, ...]] = []
    for d in range(upto + 1):
        rng = np.random.default_rng([seed, n, d])
        first = int(firsts[d % n])
        rest = [i for i in range(n) if i != first]
        order: list[int] = []
        for _ in range(_REDRAWS):
            order = [first, *rng.permutation(rest).tolist()]
            if not _repeats(order, orders, members):
                break
        orders.append(tuple(members[i] for i in order))
    return orders


def _repeats(order: list[int], earlier: list[tuple[str, ...]], members: tuple[str, ...]) -> bool:
    """Whether a prefix of ``order`` is the same subset as an earlier draw's, for a ``k`` whose
    subsets are not yet all drawn."""
    n = len(members)
    for k in range(1, n):
        if math.comb(n, k) <= len(earlier):
            continue
        mine = {members[i] for i in order[:k]}
        if any(set(e[:k]) == mine for e in earlier):
            return True
    return False
