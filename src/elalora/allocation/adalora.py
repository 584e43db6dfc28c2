"""AdaLoRA: prune-only rank allocation with a cubic budget (Zhang et al. 2023, arXiv:2303.10512
§3.3, eq. 12; SPEC §4). Same adapters and scores as ElaLoRA; only the policy differs.

Budget (``b0 = init_r · N``, ``bT = target_r · N``), exactly as PEFT's ``RankAllocator``::

    t ≤ t_i:              b(t) = b0                                         no masking
    t_i < t ≤ T − t_f:    b(t) = ⌊bT + (b0 − bT)(1 − (t − t_i)/(T − t_f − t_i))³⌋   mask when t mod Δt == 0
    t = T − t_f:          a final mask at bT is forced; afterwards the mask is kept

Masking keeps the ``b(t)`` highest-scoring ranks globally. PEFT zeroes λ of the others and lets
them revive between masks; here a pruned rank is switched off through the active mask (prune-only),
its EMA state and optimizer moments reset. Given the same scores the kept set equals PEFT's.

``budget="params"`` counts the budget in active adapter parameters instead of ranks (``b0`` the
parameters at ``init_r``, ``bT`` those of ``target_r`` ranks per matrix; a rank of matrix ``m`` costs
``c_m``): masking keeps the highest-scoring ranks, best first, while their parameters fit ``b(t)``.

Imports: numpy, torch, :mod:`elalora.config`, :mod:`.base`.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import AdaLoRAConfig
from ..layers import to_host
from .base import Allocator, apply_rank_changes, no_information, rank_cost

__all__ = ["AdaLoRAAllocator", "adalora_budget", "select_to_budget"]


def adalora_budget(t: int, *, b0: int, bT: int, tinit: int, tfinal: int, total_steps: int,
                   delta_t: int) -> tuple[int, bool]:
    """``(budget, mask now?)`` at step ``t`` — PEFT's ``budget_schedule``."""
    if t <= tinit:
        return b0, False
    if t > total_steps - tfinal:
        return bT, True
    mul = 1 - (t - tinit) / (total_steps - tfinal - tinit)
    return int((b0 - bT) * (mul**3) + bT), t % delta_t == 0


def select_to_budget(scores: list[torch.Tensor], active: list[torch.Tensor], budget: int,
                     cost: list[int] | None = None) -> dict[int, list[int]]:
    """Slots to prune so that only the ``budget`` highest-scoring active ranks remain; with ``cost``
    (parameters per rank of each matrix), the highest-scoring ranks whose parameters fit ``budget``."""
    if any(a.device.type != "cpu" for a in active):
        active = to_host(active)
    sc = torch.cat([s.double() for s in scores]).numpy()
    act = torch.cat(list(active)).numpy()
    mod = np.concatenate([np.full(len(s), m) for m, s in enumerate(scores)])
    slot = np.concatenate([np.arange(len(s)) for s in scores])
    idx = np.nonzero(act)[0]
    if cost is None:
        n_prune = len(idx) - budget
    else:  # keep the best-first prefix that fits the parameter budget
        best_first = idx[np.lexsort((slot[idx], mod[idx], sc[idx]))][::-1]
        spent = np.cumsum(np.asarray(cost, dtype=np.int64)[mod[best_first]])
        n_prune = len(idx) - int(np.searchsorted(spent, budget, side="right"))
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
        # a rank's cost: 1 (budget "rank") or its parameters (budget "params")
        self.cost = [rank_cost(a) for a in adapters] if config.budget == "params" else None
        unit = self.cost or [1] * len(adapters)
        self.b0 = sum(a.rank * c for a, c in zip(adapters, unit))
        self.bT = config.target_r * sum(unit)
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
        scores, active = importance.round_table()  # one read; the decisions are made on the host
        if no_information(scores, t):
            return []
        prune = select_to_budget(scores, active, budget, self.cost)
        return apply_rank_changes(step=t, names=self.names, adapters=self.adapters, prune=prune, grow={},
                                  seed=self.config.seed, optimizer=optimizer, importance=importance, scores=scores,
                                  active=active)

    def state_dict(self):
        return {**super().state_dict(), "b0": self.b0, "bT": self.bT}

    def load_state_dict(self, state):
        if state.get("total_steps") is not None:
            self.set_total_steps(state["total_steps"])
        self.b0 = int(state.get("b0", self.b0))
        self.bT = int(state.get("bT", self.bT))
