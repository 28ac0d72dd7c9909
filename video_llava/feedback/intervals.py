"""95% intervals of the evaluation's figures and paired comparisons of two checkpoints on the same questions: a
seeded bootstrap over the items (questions or descriptions: what one item names is not independent), Wilson's
interval for a plain proportion, and McNemar's exact test for paired right/wrong answers."""

from __future__ import annotations

import math
from typing import Sequence

RESAMPLES = 2000


def wilson(successes: int, n: int) -> list[float] | None:
    """Wilson's 95% score interval of ``successes`` / ``n`` (sound near 0 and 1, unlike the normal one)."""
    if n == 0:
        return None
    z, p = 1.959964, successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def _picks(n: int, seed: int):
    import numpy as np

    return np.random.default_rng(seed).integers(0, n, size=(RESAMPLES, n))


def ratio_with_interval(numerators: Sequence[float], denominators: Sequence[float], seed: int = 0) -> dict:
    """The pooled ratio sum(num) / sum(den) with its 95% bootstrap interval over the items."""
    import numpy as np

    num, den = np.asarray(numerators, dtype=float), np.asarray(denominators, dtype=float)
    if len(den) == 0 or den.sum() == 0:
        return {"value": None, "low": None, "high": None}
    picks = _picks(len(num), seed)
    sums = den[picks].sum(1)
    ratios = num[picks].sum(1)[sums > 0] / sums[sums > 0]
    low, high = np.percentile(ratios, [2.5, 97.5])
    return {"value": round(float(num.sum() / den.sum()), 4), "low": round(float(low), 4), "high": round(float(high), 4)}


def paired_ratio_difference(num_a: Sequence[float], den_a: Sequence[float], num_b: Sequence[float],
                            den_b: Sequence[float], seed: int = 0) -> dict:
    """ratio(a) - ratio(b) over the same items (item k of a and of b answer the same question), with the 95%
    interval of a bootstrap that resamples the items, keeping each pair together; ``excludes_zero`` says whether
    the difference is one the items can tell from none."""
    import numpy as np

    arrays = [np.asarray(x, dtype=float) for x in (num_a, den_a, num_b, den_b)]
    if len(arrays[0]) == 0 or arrays[1].sum() == 0 or arrays[3].sum() == 0:
        return {"value": None, "low": None, "high": None, "excludes_zero": False}
    picks = _picks(len(arrays[0]), seed)
    na, da, nb, db = (a[picks].sum(1) for a in arrays)
    keep = (da > 0) & (db > 0)
    differences = na[keep] / da[keep] - nb[keep] / db[keep]
    low, high = (round(float(v), 4) for v in np.percentile(differences, [2.5, 97.5]))
    value = arrays[0].sum() / arrays[1].sum() - arrays[2].sum() / arrays[3].sum()
    return {"value": round(float(value), 4), "low": low, "high": high, "excludes_zero": low > 0 or high < 0}


def mcnemar(right_a: Sequence[bool], right_b: Sequence[bool]) -> dict:
    """McNemar's exact test of paired answers: ``a_only`` and ``b_only`` right, and the two-sided p-value of so
    uneven a split of the discordant pairs were both equally good."""
    a_only = sum(1 for a, b in zip(right_a, right_b) if a and not b)
    b_only = sum(1 for a, b in zip(right_a, right_b) if b and not a)
    n = a_only + b_only
    tail = sum(math.comb(n, k) for k in range(min(a_only, b_only) + 1)) / 2 ** n if n else 1.0
    return {"a_only": a_only, "b_only": b_only, "p_value": min(1.0, 2 * tail)}
