"""Detects a diverging optimiser: a step whose loss jumps far above the recent losses of its kind.

Measured here: the ``--long`` preset's unsupervised F_R (Adam, lr 1e-3) trained normally for 1940 steps (loss
about 0.13), then its loss rose to 0.16, 3.9 and 407 in a few steps and settled near 1e6: the displacement had
blown up, and without a check the run went on to the end of its schedule and saved the destroyed network. The
trainer stops at such a jump instead, before the next checkpoint overwrites the last good one.
"""

from __future__ import annotations

from collections import defaultdict, deque
from statistics import median


class DivergenceGuard:
    """``check(key, loss)`` records ``loss`` under ``key`` (a phase and step kind) and returns a description of the
    jump when ``loss`` exceeds both ``ratio`` times the median of the previous ``window`` losses of that key and
    ``floor`` (normal losses here are Dice, NCC and small regularisers, well below it), else None. Nothing is
    checked before ``min_history`` losses of the key are known, or when ``ratio`` is 0."""

    def __init__(self, ratio: float, window: int = 50, min_history: int = 20, floor: float = 10.0) -> None:
        self.ratio = ratio
        self.min_history = min_history
        self.floor = floor
        self.history: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=window))

    def check(self, key: str, loss: float) -> str | None:
        recent = self.history[key]
        jump = None
        if self.ratio > 0 and len(recent) >= self.min_history:
            typical = median(recent)
            if loss > max(self.ratio * typical, self.floor):
                jump = (f"the loss jumped to {loss:.4g}, over {self.ratio:g}x the median of the last {len(recent)} "
                        f"steps ({typical:.4g})")
        recent.append(loss)
        return jump

    def state_dict(self) -> dict[str, list[float]]:
        """The recent losses of each key (for a checkpoint: a resumed run's check goes on where it stopped)."""
        return {key: list(losses) for key, losses in self.history.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        """Replace the recent losses with those of ``state`` (what :meth:`state_dict` returned)."""
        self.history.clear()
        for key, losses in state.items():
            self.history[key].extend(losses)
