"""Distributed helpers.

Nothing here is needed for correctness: between ``optimizer.step()`` and ``zero_grad()`` the
gradients are already all-reduced, so every replica computes the same scores, and new ranks come
from generators seeded from ``(seed, step, module index)``, so replicas make the same decisions and
draw the same vectors without communicating. :func:`assert_replicas_agree` is a cheap guard that
proves it at run time: it all-gathers one 64-bit hash of the rank pattern (masks) and raises if any
replica differs.

Imports: torch, :mod:`elalora.errors`; takes the handle by duck type.
"""

from __future__ import annotations

import hashlib

import torch

from ..errors import ReplicaMismatchError
from ..layers import full_tensor

__all__ = ["ReplicaMismatchError", "rank_pattern_digest", "assert_replicas_agree"]


def rank_pattern_digest(handle, include_weights: bool = False) -> int:
    """A 63-bit digest of every adapter's active mask (and optionally its weights)."""
    h = hashlib.blake2b(digest_size=8)
    for name, a in zip(handle.names, handle.adapters):
        h.update(name.encode())
        h.update(a.active.detach().cpu().numpy().tobytes())
        if include_weights:
            for _, p, _ in a.slot_parameters():
                h.update(full_tensor(p.detach()).float().cpu().numpy().tobytes())
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


def assert_replicas_agree(handle, include_weights: bool = False) -> None:
    """Raise :class:`ReplicaMismatchError` if ``torch.distributed`` replicas disagree. No-op when not
    distributed. One all-gather of one int64 per process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    mine = torch.tensor([rank_pattern_digest(handle, include_weights)], dtype=torch.int64, device=device)
    allv = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(allv, mine)
    values = [int(v.item()) for v in allv]
    if len(set(values)) != 1:
        raise ReplicaMismatchError(
            f"replicas disagree on the rank pattern at step {handle.step_count}: digests {values}. "
            "Check that every process uses the same seed and that gradients are synchronised before handle.step()")
