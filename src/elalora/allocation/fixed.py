"""Plain LoRA: fixed ranks, no allocation (optionally a per-module ``rank_pattern``)."""

from __future__ import annotations

from .base import Allocator

__all__ = ["FixedAllocator"]


class FixedAllocator(Allocator):
    method = "lora"

    def on_step(self, t, optimizer=None, *, importance=None, model=None):
        return []

    def set_total_steps(self, total_steps: int) -> None:
        self.total_steps = int(total_steps)
