"""Allocation policies, one small module per method, behind :class:`~.base.Allocator`."""

from __future__ import annotations

from .adalora import AdaLoRAAllocator
from .base import Allocator, RankEvent, apply_rank_changes
from .elalora import ElaLoRAAllocator
from .fixed import FixedAllocator

__all__ = ["Allocator", "RankEvent", "apply_rank_changes", "make_allocator", "ALLOCATORS"]

ALLOCATORS: dict[str, type[Allocator]] = {
    "elalora": ElaLoRAAllocator,
    "adalora": AdaLoRAAllocator,
    "lora": FixedAllocator,
}


def make_allocator(config, names, adapters) -> Allocator:
    method = config.method
    if method == "alora" and "alora" not in ALLOCATORS:
        from .alora import ALoRAAllocator  # registered lazily: it needs the training loop's batches

        ALLOCATORS["alora"] = ALoRAAllocator
    if method not in ALLOCATORS:
        raise ValueError(f"unknown method {method!r}; known: {sorted(ALLOCATORS)}")
    return ALLOCATORS[method](names, adapters, config)
