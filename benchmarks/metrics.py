"""Agreement with the full model, and the two numbers that keep it honest.

Small models answer ARC and BoolQ almost constantly, so agreement alone flatters any early
exit: Cohen's kappa and the agreement a constant answer would get go beside it everywhere.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence


def agreement(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a) if a else float("nan")


def constant_agreement(reference: Sequence[Hashable]) -> float:
    """Share of the reference's most common answer: what always giving it would agree."""
    return Counter(reference).most_common(1)[0][1] / len(reference) if reference else float("nan")


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Chance-corrected agreement; 1.0 when both answers are one identical constant."""
    n = len(a)
    if n == 0:
        return float("nan")
    observed = agreement(a, b)
    ca, cb = Counter(a), Counter(b)
    expected = sum(ca[k] * cb.get(k, 0) for k in ca) / (n * n)
    if expected == 1.0:
        return 1.0
    return (observed - expected) / (1.0 - expected)


def accuracy(answers: Sequence[Hashable], gold: Sequence[Hashable | None]) -> float:
    pairs = [(x, g) for x, g in zip(answers, gold) if g is not None]
    return sum(x == g for x, g in pairs) / len(pairs) if pairs else float("nan")
