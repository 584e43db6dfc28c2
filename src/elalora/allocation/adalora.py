"""AdaLoRA: prune-only rank allocation with a cubic budget (Zhang et al. 2023, arXiv:2303.10512
§3.3, eq. 12; SPEC §4). Same adapters and scores as ElaLoRA; only the policy differs.

Budget (``b0 = init_r · N``, ``bT = target_r · N``), exactly as PEFT's ``RankAllocator``::

    t ≤ t_i:              b(t) = b0                                         no masking
    t_i < t ≤ T − t_f:    b(t) = ⌊bT + (b0 − bT)(1 − (t − t_i)/(T − t_f − t_i))³⌋   mask when t mod Δt == 0
    t = T − t_f:          a final mask at bT is forced; afterwards the mask is kept

Masking keeps the ``b(t)`` highest-scoring ranks globally. PEFT zeroes λ of the others and lets
them revive between masks; here a pruned rank is switched off through the active mask (prune-only),
its EMA state and optimizer moments reset. Given the same scores the kept set equals PEFT's.

Imports: numpy, torch, :mod:`elalora.config`, :mod:`.base`.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import AdaLoRAConfig
from .base import Allocator, apply_rank_changes

__all__ = ["AdaLoRAAllocator", "adalora_budget", "select_to_budget"]


def adalora_budget(t: int, *, b0: int, bT: int, tinit: int, tfinal: int, total_steps: int, delta_t: int) -> tuple[int, bool]:
    """``(budget, mask now?)`` at step ``t`` — PEFT's ``budget_schedule``."""
    if t <= tinit:
        return b0, False
    if t > total_steps - tfinal:
        return bT, True
    mul = 1 - (t - tinit) / (total_steps - tfinal - tinit)
    return int((b0 - bT) * (mul**3) + bT), t % delta_t == 0


def select_to_budget(scores: list[torch.Tensor], active: list[torch.Tensor], budget: int) -> dict[int, list[int]]:
    """Slots to prune so that only the ``budget`` highest-scoring active ranks remain."""
    sc = torch.cat([s.double() for s in scores]).numpy()
    act = torch.cat([a.cpu() for a in active]).numpy()
    mod = np.concatenate([np.full(len(s), m) for m, s in enumerate(scores)])
    slot = np.concatenate([np.arange(len(s)) for s in scores])
    idx = np.nonzero(act)[0]
    n_prune = len(idx) - budget
    if n_prune <= 0:
        return {}
    order = idx[np.lexsort((slot[idx], mod[idx], sc[idx]))][:n_prune]
    prune: dict[int, list[int]] = {}
    for j in order:
        prune.setdefault(int(mod[j]), []).append(int(slot[j]))
    return prune


class AdaLoRAAllocator(Allocator):
    method = "adalora"
    uses_importance = True

    def __init__(self, names, adapters, config: AdaLoRAConfig) -> None:
        super().__init__(names, adapters, config)
        self.schedule = None
        self.b0 = sum(a.rank for a in adapters)
        self.bT = config.target_r * len(adapters)
        if config.total_steps is not None:
            self.set_total_steps(config.total_steps)

    def set_total_steps(self, total_steps: int) -> None:
        self.schedule = self.config.resolve_schedule(int(total_steps))
        self.total_steps = self.schedule.total_steps

    def budget(self, t: int) -> tuple[int, bool]:
        s = self.schedule
        return adalora_budget(t, b0=self.b0, bT=self.bT, tinit=s.tinit, tfinal=s.tfinal,
                              total_steps=s.total_steps, delta_t=s.delta_t)

    def wants_importance(self, t: int) -> bool:
        return t < self.schedule.total_steps - self.schedule.tfinal

    def on_step(self, t, optimizer=None, *, importance=None, model=None):
        s = self.schedule
        final_t = s.total_steps - s.tfinal
        if t > final_t:
            return []  # the final mask is kept (hard mask: nothing to re-apply)
        budget, mask_now = self.budget(t)
        if not (mask_now or t == final_t):
            return []
        scores = importance.rank_scores()
        prune = select_to_budget(scores, [a.active for a in self.adapters], budget)
        return apply_rank_changes(step=t, names=self.names, adapters=self.adapters, prune=prune, grow={},
                                  seed=self.config.seed, optimizer=optimizer, importance=importance, scores=scores)

    def state_dict(self):
        return {**super().state_dict(), "b0": self.b0, "bT": self.bT}

    def load_state_dict(self, state):
        if state.get("total_steps") is not None:
            self.set_total_steps(state["total_steps"])
        self.b0 = int(state.get("b0", self.b0))
        self.bT = int(state.get("bT", self.bT))
