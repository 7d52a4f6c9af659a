"""The speed guard: exit checks only where they pay, judged on this machine as answers come.

Checks (SPADE probes, L-SPADE heads) cost time on every prompt that reaches them and save time
only on the prompts that exit. Calibration plans for prompts like its own; what people ask may
exit less often, or be so short that a probe costs more than the layers it skips. The guard keeps
a running mean of what each plan's checks saved per answer, against an estimate of the full-depth
time learned from the passes that ran to the end, and stops checking a plan whose mean is
negative, except on one question in `explore_every`, so that it notices when the balance turns.
Skipping checks only ever means answering at full depth: fidelity is untouched.

The guard holds numbers, not clocks: callers report measured milliseconds, so tests can inject
costs. It is safe to share between threads.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class GuardDecision:
    check: bool  # run the plan's checks (False: a plain full-depth pass)
    reason: str  # "off", "learning", "pays", "does not pay", "exploring"


@dataclass
class _PlanStats:
    saving: float = 0.0  # running mean of ms saved per checked answer (negative: the checks cost)
    checked: int = 0
    exited: int = 0
    skipped: int = 0
    decisions: int = 0
    off: int = 0
    full: deque = field(default_factory=lambda: deque(maxlen=64))  # (prompt tokens, full-depth ms)


class SpeedGuard:
    """Per plan: a running mean of the time saved per checked answer; checks off while it is negative.

    `min_checked`: checked answers before the guard may switch a plan off. `explore_every`: while a
    plan is off, every n-th of its questions is checked anyway (the stated share that lets it
    recover). `alpha`: the weight of the newest answer in the running mean.
    """

    def __init__(self, enabled: bool = True, min_checked: int = 8, explore_every: int = 10, alpha: float = 1 / 16):
        if min_checked < 1 or explore_every < 2 or not 0 < alpha <= 1:
            raise ValueError("min_checked >= 1, explore_every >= 2 and 0 < alpha <= 1")
        self.enabled = enabled
        self.min_checked, self.explore_every, self.alpha = min_checked, explore_every, alpha
        self._plans: dict[str, _PlanStats] = {}
        self._lock = threading.Lock()

    def decide(self, plan: str) -> GuardDecision:
        """Whether the next question of `plan` runs its checks."""
        if not self.enabled:
            return GuardDecision(True, "off")
        with self._lock:
            s = self._plans.setdefault(plan, _PlanStats())
            s.decisions += 1
            if s.checked < self.min_checked:
                return GuardDecision(True, "learning")
            if s.saving >= 0:
                s.off = 0
                return GuardDecision(True, "pays")
            s.off += 1  # questions since the checks were switched off
            if s.off % self.explore_every == 0:
                return GuardDecision(True, "exploring")
            s.skipped += 1
            return GuardDecision(False, "does not pay")

    def record_full(self, plan: str, n_tokens: int, full_ms: float) -> None:
        """A full-depth pass of `n_tokens` took `full_ms` (without the time spent in checks)."""
        with self._lock:
            self._plans.setdefault(plan, _PlanStats()).full.append((n_tokens, full_ms))

    def record_checked(
        self,
        plan: str,
        n_tokens: int,
        total_ms: float,
        check_ms: float,
        exited: bool,
        prefix_ms: float | None = None,
        fraction: float | None = None,
    ) -> float:
        """A checked answer: its total time, the time inside checks, and whether it exited.

        Without an exit the checks were pure cost (`check_ms`), and the rest was a full-depth pass.
        With one, the saving is the estimated full-depth time less the total; with no full-depth
        pass seen yet the estimate extrapolates the pass that ran (`prefix_ms` of the layers up to
        the exit, `fraction` of the model's layers). Returns the saving recorded, in ms.
        """
        with self._lock:
            s = self._plans.setdefault(plan, _PlanStats())
            s.checked += 1
            if exited:
                s.exited += 1
                full = self._full_estimate(s, n_tokens)
                if full is None and prefix_ms is not None and fraction:
                    full = prefix_ms / fraction
                saving = (full - total_ms) if full is not None else 0.0
            else:
                s.full.append((n_tokens, total_ms - check_ms))
                saving = -check_ms
            s.saving = saving if s.checked == 1 else (1 - self.alpha) * s.saving + self.alpha * saving
            return saving

    @staticmethod
    def _full_estimate(s: _PlanStats, n_tokens: int) -> float | None:
        """Full-depth ms at `n_tokens`: a line through the passes seen (their mean with one length)."""
        if not s.full:
            return None
        n, ms = np.array(s.full, dtype=float).T
        if np.ptp(n) == 0:
            return float(ms.mean())
        slope, intercept = np.polyfit(n, ms, 1)
        return float(intercept + slope * n_tokens)

    def stats(self) -> dict[str, dict]:
        """Per plan: answers checked and exited, skipped, the running mean saving (ms), checking or not."""
        with self._lock:
            return {
                plan: {
                    "checked": s.checked,
                    "exited": s.exited,
                    "skipped": s.skipped,
                    "mean_saving_ms": round(s.saving, 3),
                    "checking": not (s.checked >= self.min_checked and s.saving < 0),
                }
                for plan, s in self._plans.items()
            }
