"""Allocation policies, one small module per method, behind :class:`~.base.Allocator`.

``elalora`` (prune and grow), ``adalora`` (prune to a budget), ``alora`` (ablation-scored prune
and regrow); ``gelora`` is a planner run before training (:mod:`.gelora`), not an allocator.
Plain LoRA has no allocator: it is PEFT's own LoRA.

Imports: :mod:`elalora.layers`, :mod:`elalora.config`, :mod:`elalora.targets`,
:mod:`elalora.errors` (and :mod:`elalora.importance` for type hints).
"""

from __future__ import annotations

from ..errors import ConfigError
from .adalora import AdaLoRAAllocator
from .alora import ALoRAAllocator
from .base import Allocator, RankEvent, apply_rank_changes
from .elalora import ElaLoRAAllocator

__all__ = ["Allocator", "RankEvent", "apply_rank_changes", "make_allocator", "ALLOCATORS"]

ALLOCATORS: dict[str, type[Allocator]] = {
    "elalora": ElaLoRAAllocator,
    "adalora": AdaLoRAAllocator,
    "alora": ALoRAAllocator,
}


def make_allocator(config, names, adapters) -> Allocator:
    if config.method not in ALLOCATORS:
        raise ConfigError(f"unknown method {config.method!r}; known: {sorted(ALLOCATORS)}")
    return ALLOCATORS[config.method](names, adapters, config)
