"""ElaLoRA: prune *and* expand ranks under a fixed total budget (Chang et al. 2025,
arXiv:2504.00254, §3.3–3.4; SPEC §3).

Phases (``t`` the 0-based optimizer step, ``T`` the total)::

    warm-up          t ≤ t_i            ranks fixed, scores updated
    dynamic          t_i < t < T − t_f  scores updated; a round when (t − t_i) mod Δt == 0 and b_t > 0
    stabilisation    t ≥ T − t_f        ranks frozen, no score updates

Rank-change scheduler: ``p = clamp((t − t_i) / (T − t_f − t_i), 0, 1)``,
``b_t = round(b (1 − p³))`` with Python's round-half-to-even, as in the authors' code.

One round: every matrix ``m`` offers its ``min(k, r_m)`` weakest active ranks as candidates; the
pool is ordered by ``(score, module index, slot)`` (a deterministic tie-break); the ``b_t`` weakest
candidates are pruned and the matrices owning the ``b_t`` strongest candidates get one new rank per
entry (the max–min criterion: a matrix whose *weakest* ranks still score high needs capacity). Total
rank stays exactly constant.

Fixes relative to the authors' code (SPEC §3, "defects"): a matrix at its minimum rank still offers
candidates, so it can still grow (only its pruning is blocked); a matrix at its capacity can still
shrink (only its growth is blocked); exactly ``b_t`` ranks move (no threshold ties); when the
minimum/capacity constraints leave fewer feasible moves, prunes and grows are trimmed to the same
count so the budget is conserved.

Additions (``ElaLoRAConfig``): ``grace_rounds`` keeps a rank grown in round ``j`` out of the candidate
pool in rounds ``j+1 … j+grace_rounds`` (a newborn rank scores about 0, so otherwise it is the first to
be pruned again: the allocator counts such *churn*, :meth:`ElaLoRAAllocator.churn`). ``budget="params"``
conserves active adapter parameters instead of ranks: the ``b_t`` weakest candidates are pruned as
before, then the strongest candidates grow one rank each, strongest first, while the active parameters
stay within those of the start (a rank of matrix ``m`` costs ``c_m``, its parameters per rank); a round
in which nothing can grow prunes nothing.

Imports: numpy, torch, :mod:`elalora.config`, :mod:`.base`.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import ElaLoRAConfig
from ..layers import to_host
from .base import Allocator, apply_rank_changes, no_information, rank_cost

__all__ = ["ElaLoRAAllocator", "elalora_b_t", "select_prune_grow"]


def elalora_b_t(t: int, *, b: int, tinit: int, tfinal: int, total_steps: int, use_scheduler: bool = True) -> int:
    """The number of ranks moved at step ``t`` if a round happens there (SPEC §3)."""
    if not use_scheduler:
        return b
    span = total_steps - tfinal - tinit
    p = min(max((t - tinit) / span, 0.0), 1.0)
    return int(round(b * (1.0 - p**3)))


def _padded_rows(rows: list[torch.Tensor], width: int, fill) -> torch.Tensor:
    """The 1-D tensors ``rows`` as one CPU ``(M × width)`` matrix, cut or padded with ``fill``.

    One ``torch.stack`` in the usual case (every matrix has the same capacity): a per-matrix Python
    loop, or even ``pad_sequence`` (10× slower than ``stack`` here), costs milliseconds per round
    with a few hundred matrices (benchmarks/alloc_scaling.py). Rows not on the CPU are read in one
    transfer per device (:func:`~elalora.layers.to_host`); the allocators pass host rows.
    """
    # (host rows never need it, and on thousands of unbind() views detach() alone cost most of a round)
    rows = [x.detach() if x.requires_grad else x for x in rows]
    if not all(x.is_cpu for x in rows):
        rows = to_host(rows)
    m = None
    if all(x.numel() == width for x in rows):
        m = torch.stack(rows)
    if m is None:
        m = torch.nn.utils.rnn.pad_sequence([x[:width] for x in rows], batch_first=True, padding_value=fill)
    if m.shape[1] < width:  # every row shorter than the capacity: the missing slots are padding
        m = torch.nn.functional.pad(m, (0, width - m.shape[1]), value=fill)
    return m


def select_prune_grow(
    scores: list[torch.Tensor],
    active: list[torch.Tensor],
    capacity: list[int],
    *,
    k: int,
    b: int,
    min_rank: int,
    protected: list[torch.Tensor] | None = None,
    cost: list[int] | None = None,
    param_budget: int | None = None,
) -> tuple[dict[int, list[int]], dict[int, int]]:
    """Decide one round. Returns ``(prune, grow)``: slots to prune per matrix, ranks to add per matrix.

    ``protected`` (bool per slot): active slots that are no candidates (grace period). ``cost`` and
    ``param_budget``: the parameter budget (module docstring); ``None``: the rank budget.

    Vectorised: one padded ``(M × c)`` matrix, one ``topk`` and one ``lexsort`` over ≤ ``k·M``
    candidates.
    """
    m_count = len(scores)
    cmax = max(capacity)
    s = _padded_rows(scores, cmax, float("inf")).double()
    act = _padded_rows(active, cmax, False)
    s = s.masked_fill(~act, float("inf"))
    if protected is not None:
        s = s.masked_fill(_padded_rows(protected, cmax, False), float("inf"))
    ranks = act.sum(1).numpy()
    kk = min(k, cmax)
    vals, slots = torch.topk(s, kk, dim=1, largest=False, sorted=True)
    vals, slots = vals.numpy(), slots.numpy()
    mods = np.repeat(np.arange(m_count)[:, None], kk, axis=1)
    valid = np.isfinite(vals)  # only active slots, at most min(k, r_m) per matrix
    cv, cm, cs = vals[valid], mods[valid], slots[valid]
    order = np.lexsort((cs, cm, cv))  # by score, then module index, then slot
    cv, cm, cs = cv[order], cm[order], cs[order]
    n = len(cv)
    b = min(b, n // 2)
    if b <= 0:
        return {}, {}

    def choose(b_now: int):
        pruned = np.zeros(m_count, dtype=int)
        prune_idx: list[int] = []
        for j in range(n):
            if len(prune_idx) == b_now:
                break
            m = cm[j]
            if ranks[m] - pruned[m] > min_rank:
                pruned[m] += 1
                prune_idx.append(j)
        taken = set(prune_idx)
        grown = np.zeros(m_count, dtype=int)
        grow_idx: list[int] = []
        for j in range(n - 1, -1, -1):
            if len(grow_idx) == len(prune_idx):
                break
            if j in taken:
                continue
            m = cm[j]
            if ranks[m] - pruned[m] + grown[m] < capacity[m]:
                grown[m] += 1
                grow_idx.append(j)
        return prune_idx, grow_idx

    def choose_params(b_now: int):
        """Prune as ``choose``; grow the strongest candidates while the parameters fit the budget."""
        prune_idx, _ = choose(b_now)
        taken = set(prune_idx)
        used = int(sum(int(ranks[m]) * cost[m] for m in range(m_count)) - sum(cost[cm[j]] for j in prune_idx))
        pruned = np.bincount(cm[prune_idx].astype(int), minlength=m_count) if prune_idx else np.zeros(m_count, int)
        grown = np.zeros(m_count, dtype=int)
        grow_idx: list[int] = []
        for j in range(n - 1, -1, -1):
            m = cm[j]
            if j in taken or ranks[m] - pruned[m] + grown[m] >= capacity[m] or used + cost[m] > param_budget:
                continue
            used += cost[m]
            grown[m] += 1
            grow_idx.append(j)
        return (prune_idx, grow_idx) if grow_idx else ([], [])

    if param_budget is not None:
        prune_idx, grow_idx = choose_params(b)
    else:
        prune_idx, grow_idx = choose(b)
        while len(grow_idx) < len(prune_idx):  # capacity blocked some growth: move fewer ranks
            prune_idx, grow_idx = choose(len(grow_idx))
    prune: dict[int, list[int]] = {}
    for j in prune_idx:
        prune.setdefault(int(cm[j]), []).append(int(cs[j]))
    grow: dict[int, int] = {}
    for j in grow_idx:
        grow[int(cm[j])] = grow.get(int(cm[j]), 0) + 1
    return prune, grow


class ElaLoRAAllocator(Allocator):
    method = "elalora"
    uses_importance = True

    def __init__(self, names, adapters, config: ElaLoRAConfig) -> None:
        super().__init__(names, adapters, config)
        config.check_pool(len(adapters))
        self.schedule = None
        self.rounds = 0
        self.moved = 0
        # "params": the active adapter parameters of the start (LoRA's at the same r on the LoRA form)
        self.cost = [rank_cost(a) for a in adapters] if config.budget == "params" else None
        self.param_budget = sum(a.rank * c for a, c in zip(adapters, self.cost)) if self.cost else None
        # round (0-based) in which each slot was last grown; -1: never (initial ranks count as old)
        self.born = [[-1] * a.capacity for a in adapters]
        self.grown_total = 0
        self.churned = 0  # ranks pruned within CHURN_ROUNDS rounds of their birth
        if config.total_steps is not None:
            self.set_total_steps(config.total_steps)

    def set_total_steps(self, total_steps: int) -> None:
        self.schedule = self.config.resolve_schedule(int(total_steps))
        self.total_steps = self.schedule.total_steps

    def phase(self, t: int) -> str:
        s = self.schedule
        if t <= s.tinit:
            return "warmup"
        if t >= s.total_steps - s.tfinal:
            return "final"
        return "dynamic"

    def b_at(self, t: int) -> int:
        s = self.schedule
        return elalora_b_t(t, b=self.config.b, tinit=s.tinit, tfinal=s.tfinal, total_steps=s.total_steps,
                           use_scheduler=self.config.use_scheduler)

    def is_round(self, t: int) -> bool:
        return (self.phase(t) == "dynamic" and (t - self.schedule.tinit) % self.schedule.delta_t == 0
                and self.b_at(t) > 0)

    def planned_rounds(self) -> list[tuple[int, int]]:
        """``(step, b_t)`` of every round of the run."""
        return [(t, self.b_at(t)) for t in range(self.schedule.total_steps) if self.is_round(t)]

    def wants_importance(self, t: int) -> bool:
        return self.phase(t) != "final"

    def protected(self) -> list[torch.Tensor] | None:
        """Slots in their grace period at the coming round (``None`` when ``grace_rounds`` is 0)."""
        g = self.config.grace_rounds
        if not g:
            return None
        return [torch.tensor([self._grown_within(j, g) for j in born], dtype=torch.bool, device="cpu")
                for born in self.born]

    def _grown_within(self, born: int, n: int) -> bool:
        """Whether a slot born in round ``born`` was grown within the last ``n`` rounds (as seen from the
        coming round). ``born = -1`` (never grown: an initial rank) is never young. Without that test, round
        r <= g - 1 saw every initial rank as "grown in round -1" and grace moved nothing (fixed 2026-12-06;
        docs/results.md §3)."""
        return born >= 0 and self.rounds - born <= n

    def churn(self) -> dict[str, int]:
        """``grown``: ranks grown so far; ``pruned_young``: of those, pruned within ``CHURN_ROUNDS`` rounds
        of their birth (a measure of wasted moves: the planted-rank benchmark reports it)."""
        return {"grown": self.grown_total, "pruned_young": self.churned, "within_rounds": CHURN_ROUNDS}

    def on_step(self, t, optimizer=None, *, importance=None, model=None):
        if not self.is_round(t):
            return []
        # one read of the score table and the masks; the decisions are made on the host
        scores, active = importance.round_table()
        if no_information(scores, t):
            return []
        prune, grow = select_prune_grow(
            scores, active, [a.capacity for a in self.adapters],
            k=self.config.k, b=self.b_at(t), min_rank=self.config.min_rank, protected=self.protected(),
            cost=self.cost, param_budget=self.param_budget)
        for m, slots in prune.items():
            for s in slots:
                self.churned += self._grown_within(self.born[m][s], CHURN_ROUNDS)
                self.born[m][s] = -1
        before = {m: active[m].numpy().copy() for m in grow}
        events = apply_rank_changes(step=t, names=self.names, adapters=self.adapters, prune=prune, grow=grow,
                                    seed=self.config.seed, optimizer=optimizer, importance=importance, scores=scores,
                                    active=active)
        for m, was in before.items():
            dead = set(prune.get(m, []))
            now = active[m].numpy()  # the masks after the round (apply_rank_changes updated them)
            for slot in range(len(now)):  # active now and (inactive before or pruned in this round): new
                if now[slot] and (not was[slot] or slot in dead):
                    self.born[m][slot] = self.rounds
            self.grown_total += grow[m]
        self.rounds += 1
        self.moved += sum(len(v) for v in prune.values())
        return events

    def state_dict(self):
        return {**super().state_dict(), "rounds": self.rounds, "moved": self.moved, "born": self.born,
                "grown_total": self.grown_total, "churned": self.churned, "param_budget": self.param_budget}

    def load_state_dict(self, state):
        if state.get("total_steps") is not None:
            self.set_total_steps(state["total_steps"])
        self.rounds = int(state.get("rounds", 0))
        self.moved = int(state.get("moved", 0))
        if state.get("born") is not None:
            born = [list(map(int, b)) for b in state["born"]]
            if [len(b) for b in born] != [a.capacity for a in self.adapters]:
                raise ValueError("allocator state: the birth rounds do not match the adapters' capacities")
            self.born = born
        self.grown_total = int(state.get("grown_total", 0))
        self.churned = int(state.get("churned", 0))
        if state.get("param_budget") is not None:
            self.param_budget = int(state["param_budget"])


#: "churn": a rank pruned within this many rounds of its birth
CHURN_ROUNDS = 2

