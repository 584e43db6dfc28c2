"""Progress display for ALoRA rounds: a ``tqdm`` bar of the masks evaluated, and the round's duration.

The library core only calls ``progress(done, total)`` (``ALoRAAllocator.progress``); this module turns
those calls into a progress bar and a log line, for the CLI or any script::

    handle.allocator.progress = RoundProgress(log=print)

Imports: :mod:`elalora._extras`; ``tqdm`` (the ``[cli]`` extra) only when the first round starts.
"""

from __future__ import annotations

import time
from typing import Callable

from .._extras import require

__all__ = ["RoundProgress", "describe_cost"]


class RoundProgress:
    """``progress(done, total)`` callback: one ``tqdm`` bar per round (masks done of total), closed at
    the end of the round, then ``log("ALoRA round k: … masks in … s")``."""

    def __init__(self, log: Callable[[str], None] | None = None, *, desc: str = "ALoRA round", leave: bool = False,
                 disable: bool | None = None) -> None:
        self.log = log
        self.desc = desc
        self.leave = leave
        self.disable = disable
        self.rounds = 0
        self._bar = None
        self._t0 = 0.0
        self._last = 0

    def __call__(self, done: int, total: int) -> None:
        if done == 0 or self._bar is None:
            tqdm = require("tqdm.auto", "the ALoRA round progress bar").tqdm

            self._close()
            self.rounds += 1
            self._t0 = time.perf_counter()
            self._last = 0
            self._bar = tqdm(total=total, desc=f"{self.desc} {self.rounds}: masks", unit="mask", leave=self.leave,
                             dynamic_ncols=True, disable=self.disable)
        self._bar.update(done - self._last)
        self._last = done
        if done >= total:
            self._close()
            if self.log is not None:
                self.log(f"ALoRA round {self.rounds}: {total} masks in {time.perf_counter() - self._t0:.1f} s")

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def describe_cost(cost: dict) -> str:
    """One line from ``ALoRAAllocator.expected_cost()``: rounds × masks × held-out examples, and the
    share of the run's compute it would take (estimate)."""
    r, m, v = cost["rounds"], cost["masks"], cost["val_examples"]
    abl = cost["ablation_example_forwards"]
    line = f"ALoRA schedule: {r} round(s) × {m} masks × {v} held-out examples = {abl:,} example forward passes"
    train = cost.get("training_example_forwards")
    if train:
        line += (f" vs ≈ {train:,} for training (forward + backward ≈ 2 passes per example): "
                 f"≈ {abl / (abl + train):.0%} of the run's compute before prefix reuse (which saves about half)")
    if cost.get("rounds_uncapped", r) > r:
        line += (f"; capped from {cost['rounds_uncapped']} rounds by the ablation budget "
                 f"{cost.get('budget')} (--alora-budget)")
    return line
