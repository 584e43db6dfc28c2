"""ALoRA: ablation-based rank importance (AB-LoRA) and prune-and-reallocate rounds (Liu et al. 2024,
arXiv:2403.16187, §3.2–3.3; SPEC §5).

Adapters are gated plain LoRA (:class:`~elalora.layers.GatedLoRAAdapter`,
``ΔW = B · diag(m) · A · s`` with the 0/1 active mask ``m`` as the gate). Every module starts at
``r`` ranks, so the budget ``R_target = r × N`` holds from the start.

Importance (AB-LoRA, §3.2)
--------------------------
With ``S(·) = −L(·)`` the loss on one held-out batch ``B_val``, the score of active rank ``ρ`` is::

    IS(ρ) = S(M) − S(M \\ ρ) + S(M_ρ)
          = −L(M) + L(M with only ρ removed) − L(M with only ρ kept, every other rank of EVERY module removed)

Ablations are *batched*: ``B_val`` is repeated ``c = ablation_chunk`` times along the batch dimension
and every adapter's ``example_gate`` (shape ``(c·|B_val|, capacity)``) switches slots off per copy,
so one forward pass evaluates ``c`` masks (this needs the batch on dimension 0 of every adapted
layer's input, as in Hugging Face models). The loss is reduced per mask (see :func:`ablation_scores`).
The model runs in eval mode under ``torch.no_grad()``; the training flags
and ``example_gate = None`` are restored afterwards, also when the forward pass raises.

Cost per round, with ``P`` active ranks and ``c = ablation_chunk``: ``1 + 2P`` masks (the full
model, ``P`` "removed", ``P`` "kept only"), evaluated in ``⌈(1 + 2P) / c⌉ ≈ 1 + 2P/c`` forward passes,
each over ``c`` copies of ``B_val`` (the last one possibly fewer). That is the compute of ``1 + 2P``
forward passes over ``B_val`` — no backward pass — in ``c`` times fewer kernel launches; peak memory is
that of one no-grad forward pass over ``c·|B_val|`` examples. E.g. BERT-base with all 72 projections at
``r = 8``: ``P = 576``, 1153 masks, 145 passes of ``8 × 32`` examples at ``c = 8``.

Prefix reuse (``prefix_reuse=True``, the default): a mask that removes or keeps one rank of adapter
``a`` computes, up to ``a``, what the full model (removed) or the base model (kept only) computes.
The outputs of the modules that finish before each adapter starts are cached once per round from
those two models, and each chunk of masks (sorted by adapter, in execution order) runs with them
stubbed, so only the part of the forward pass from ``a`` on is recomputed — about half a forward pass
on average over a layer stack, less for deeper models. Same scores to float rounding, generic over
Hugging Face models, with a fallback to the full forward pass: :mod:`elalora.allocation.alora_reuse`.
``progress(done, total)`` (``ALoRAAllocator.progress``) reports the masks evaluated during a round.

Procedure (§3.3)
----------------
``t`` is the 0-based optimizer step; ``K1 = max(k1, 1)`` and ``K2`` are in optimizer steps (fractions
are resolved against the run's total steps ``T``). A round runs at the ``on_step`` call of step ``t``
when ``t + 1 = K1 + j·K2`` (after ``K1`` warm-up steps, then every ``K2`` steps), at most
``n_rounds`` times, and only if ``K2`` training steps still follow it (``t + 1 + K2 ≤ T``): every
round of the paper is followed by ``K2`` steps of training. ``n_rounds`` is further capped by
``ablation_budget`` (:meth:`ALoRAAllocator.max_rounds`): no more rounds than keep the ablations'
cost within ``ablation_budget ×`` the training cost, but at least one (``ALoRAConfig``). One round:

1. score every active rank (above);
2. prune the ``n_a`` lowest-scoring ranks (default ``n_a = N``, one per module), in the order
   ``(score, module index, slot)`` — a deterministic tie-break — skipping a rank whose module is
   already at ``min_rank``;
3. give as many new ranks as were pruned to the modules that lost none this round: round-robin in
   decreasing order of the module's *average* importance (mean ``IS`` over its active ranks; ties to the
   lower module index), i.e. as evenly as possible with the leftover going to the more important
   modules (the paper's footnote: ``n_A = 8`` over three modules gives 3, 3, 2); a module at capacity
   (``max_rank``) is skipped and its share goes to the next (:func:`distribute_new_ranks`).

New ranks go through :func:`~.base.apply_rank_changes` like every other method: ``A`` Kaiming-uniform
from the seeded generator of ``(seed, step, module)``, ``B = 0`` (ΔW unchanged), zero optimizer
moments; pruned slots are zeroed with zero moments.

Design decisions
----------------
* **Minimum rank.** ``min_rank`` (default 1) is a floor on pruning. The paper sets no floor: a module
  can lose every rank (``min_rank = 0`` reproduces that). The default keeps every adapted module alive,
  since the ablation score of a module's last rank is noisy on one small batch. A module at rank 0 has
  no importance and receives no new rank (it stays removed, as in the paper's pruning).
* **Keep the budget** (``keep_budget=True``, the default). The paper adds new ranks only to modules
  that lost none; if every module lost one (or every such module is at rank 0 or at capacity),
  nothing — or only part — is added and the total budget shrinks. With our ``min_rank = 1`` floor
  this is the rule, not the exception, at small r: at r = 2 a module can lose only one rank, so
  ``n_a = N`` prunes one rank in *every* module and the paper's rule adds none back — the first
  round halves the budget. So pruning skips a rank that could not be given back this round (the
  modules that lost none lack the room): only what can be reallocated is pruned, and the total rank
  is kept. At r = 2, capacity 4, that prunes at most ⌊2N/3⌋ ranks in a round. ``keep_budget=False``
  is the paper's rule; any shortfall is counted in ``budget_lost`` and visible in the
  :class:`~.base.RankEvent` list (``pruned`` vs ``grown``).

Giving ``B_val``
----------------
The allocator needs one held-out batch before its first round::

    handle.allocator.set_validation_batch({"input_ids": ..., "attention_mask": ..., "labels": ...})

a dict (or ``BatchEncoding``) of tensors with the batch on dimension 0, e.g. a collated batch of
``config.val_batch_size`` (32) examples of the validation split. The CLI and the Trainer integration
call it; with a plain loop, call it yourself before training. If a round is due and no batch was set,
:class:`RuntimeError` is raised. The batch is not saved in :meth:`ALoRAAllocator.state_dict`: set it
again after resuming. Under DDP every process must set the same batch (the decisions are then
identical without communication).

Default loss (the ``labels`` key is removed from the model inputs and used here, as Hugging Face does):
logits of shape ``(n, C)`` — cross-entropy, MSE when ``num_labels == 1`` or
``problem_type == "regression"``, BCE-with-logits for ``"multi_label_classification"`` (HF's rules);
logits ``(n, T, V)`` — token cross-entropy with ``-100`` ignored, labels shifted by one for causal LMs,
not for token classification / masked LM / encoder-decoder models; the loss of a mask is the mean over
its valid tokens (the same value as the model's own loss on ``B_val``). Anything else: pass
``loss_fn(model_outputs, batch) -> per-example loss`` to :meth:`ALoRAAllocator.set_validation_batch`;
it receives the repeated batch (labels included) and the mean of its output over each copy of
``B_val`` is that mask's loss.

The ablations themselves (:func:`ablation_scores`) live in :mod:`.alora_ablation`, prefix reuse in
:mod:`.alora_reuse`; this module holds the reallocation rule and the rounds.

Imports: numpy, torch, :mod:`elalora.config`, :mod:`.alora_ablation`, :mod:`.base`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..config import ALoRAConfig, ConfigError
from .alora_ablation import LossFn, ProgressFn, _batch_size, ablation_scores
from .base import Allocator, active_on_host, apply_rank_changes

__all__ = ["ALoRAAllocator", "ablation_scores", "select_prune", "distribute_new_ranks", "plan_round"]

# ------------------------------------------------------------------------------------ policy
def select_prune(scores: Sequence[torch.Tensor], active: Sequence[torch.Tensor], n_a: int, min_rank: int,
                 capacity: Sequence[int] | None = None) -> dict[int, list[int]]:
    """The ``n_a`` lowest-scoring active ranks, ordered by ``(score, module index, slot)``; a rank
    whose module is already at ``min_rank`` (counting this round's prunes) is skipped.

    With ``capacity`` (the keep-budget rule), a rank is also skipped when taking it would leave the
    modules that lost none this round without room (capacity − rank, modules at rank 0 excluded) for
    every rank pruned so far: only what can be given back is pruned, so the total rank is kept."""
    sc, mo, sl = [], [], []
    for m, (s, a) in enumerate(zip(scores, active)):
        idx = torch.nonzero(a.cpu(), as_tuple=False).flatten()
        sc.append(s.double().cpu()[idx].numpy())
        mo.append(np.full(idx.numel(), m))
        sl.append(idx.numpy())
    if not sc:
        return {}
    sc, mo, sl = np.concatenate(sc), np.concatenate(mo), np.concatenate(sl)
    order = np.lexsort((sl, mo, sc))
    left = [int(a.sum()) for a in active]
    room = [int(c) - r if r > 0 else 0 for c, r in zip(capacity, left)] if capacity is not None else None
    free = sum(room) if room is not None else 0  # room of the modules that lost none so far
    prune: dict[int, list[int]] = {}
    taken = 0
    for j in order:
        if taken >= n_a:
            break
        m = int(mo[j])
        if left[m] <= min_rank:
            continue
        if room is not None:
            free_after = free - (room[m] if m not in prune else 0)
            if taken + 1 > free_after:
                continue  # could not be given back: keep it (a rank of an already-pruned module may still fit)
            free = free_after
        left[m] -= 1
        prune.setdefault(m, []).append(int(sl[j]))
        taken += 1
    return prune


def distribute_new_ranks(n_new: int, avg_importance: Sequence[float], room: Sequence[int]) -> list[int]:
    """Split ``n_new`` ranks over candidate modules as evenly as possible (ALoRA §3.3).

    Round-robin in decreasing ``avg_importance`` (ties: lower position first): each pass gives one
    rank to every candidate with free ``room`` (capacity − rank), so the counts differ by at most one
    among modules not at capacity and the leftover goes to the more important ones. A module at
    capacity is skipped; its share goes to the next. Returns counts aligned with the inputs; their sum
    is ``min(n_new, sum(room))``.

    >>> distribute_new_ranks(8, [0.2, 0.9, 0.5], [99, 99, 99])   # the paper's footnote: 3, 3, 2
    [2, 3, 3]
    """
    k = len(avg_importance)
    if len(room) != k:
        raise ValueError("avg_importance and room must have the same length")
    order = sorted(range(k), key=lambda i: (-float(avg_importance[i]), i))
    given = [0] * k
    left = int(n_new)
    while left > 0:
        progressed = False
        for i in order:
            if left == 0:
                break
            if given[i] < room[i]:
                given[i] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    return given


def plan_round(scores: Sequence[torch.Tensor], active: Sequence[torch.Tensor], capacity: Sequence[int], *,
               n_a: int, min_rank: int, keep_budget: bool = True) -> tuple[dict[int, list[int]], dict[int, int]]:
    """One ALoRA round: ``(prune, grow)`` — slots to prune per module, new ranks per module."""
    prune = select_prune(scores, active, n_a, min_rank, capacity if keep_budget else None)
    n_pruned = sum(len(v) for v in prune.values())
    cands, avg, room = [], [], []
    for m, (s, a) in enumerate(zip(scores, active)):
        r = int(a.sum())
        if m in prune or r == 0:
            continue  # lost a rank this round, or removed (rank 0: no importance)
        cands.append(m)
        avg.append(float(s.double().cpu()[a.cpu()].mean()))
        room.append(int(capacity[m]) - r)
    counts = distribute_new_ranks(n_pruned, avg, room)
    grow = {m: c for m, c in zip(cands, counts) if c > 0}
    return prune, grow


class ALoRAAllocator(Allocator):
    """The ALoRA policy (module docstring). Needs :meth:`set_validation_batch` before its first round."""

    method = "alora"
    uses_importance = False

    def __init__(self, names, adapters, config: ALoRAConfig) -> None:
        super().__init__(names, adapters, config)
        self.n_a = int(config.n_a) if config.n_a is not None else len(adapters)
        self.k1: int | None = None
        self.k2: int | None = None
        self.rounds_done = 0
        self.last_round_step: int | None = None
        self.round_steps: list[int] = []
        self.pruned_total = 0
        self.grown_total = 0
        self.budget_lost = 0
        self.last_scores: list[torch.Tensor] | None = None
        self.val_batch: dict | None = None
        self.loss_fn: LossFn | None = None
        self.step_examples: int | None = None
        self.round_seconds: list[float] = []
        # Optional ``progress(done, total)`` called with the masks evaluated so far during a round
        # (the CLI shows a progress bar with it); not saved.
        self.progress: ProgressFn | None = None
        if config.total_steps is not None:
            self.set_total_steps(config.total_steps)

    # ------------------------------------------------------------------------------ inputs
    def set_validation_batch(self, batch: Mapping, loss_fn: LossFn | None = None) -> None:
        """Set the held-out batch ``B_val`` of the ablations (a dict of tensors, batch on dim 0; with
        ``labels`` unless ``loss_fn(model_outputs, batch) -> per-example loss`` is given). Kept as
        given (moved to the model's device at each round); not saved in checkpoints."""
        if not isinstance(batch, Mapping):
            raise TypeError(f"the validation batch must be a dict of tensors; got {type(batch).__name__}")
        batch = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in batch.items()}
        _batch_size(batch)
        if loss_fn is None and "labels" not in batch:
            raise ValueError("the validation batch has no 'labels'; add them or pass loss_fn(model_outputs, batch)")
        self.val_batch = batch
        self.loss_fn = loss_fn

    def set_total_steps(self, total_steps: int) -> None:
        schedule = self.config.resolve_schedule(int(total_steps))
        self.k1, self.k2 = schedule.k1, schedule.k2
        self.total_steps = int(total_steps)

    def set_step_examples(self, n: int) -> None:
        """Training examples per optimizer step on this process (batch size × gradient
        accumulation), for the ``ablation_budget`` cap on the rounds. The Trainer callback sets it."""
        if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
            raise ValueError(f"examples per step must be an integer >= 1; got {n!r}")
        self.step_examples = int(n)

    # ------------------------------------------------------------------------------ cost
    def _val_size(self) -> int:
        return _batch_size(self.val_batch) if self.val_batch is not None else int(self.config.val_batch_size)

    def expected_cost(self) -> dict:
        """The ablation cost of the run, in example forward passes (see ``ALoRAConfig.ablation_budget``):
        ``rounds × masks × held-out examples``, with ``masks = 1 + 2R`` at the starting budget ``R``,
        and, when the examples per step are known, the training cost ``2 × T × examples_per_step``
        it is compared with. ``rounds_uncapped`` is what the schedule alone would give."""
        ranks = sum(int(a.r_init) for a in self.adapters)
        masks = 1 + 2 * ranks
        val = self._val_size()
        uncapped = len(self._scheduled_rounds(self.config.n_rounds))
        rounds = len(self.planned_rounds())
        out = {"rounds": rounds, "rounds_uncapped": uncapped, "masks": masks, "val_examples": val,
               "ablation_example_forwards": rounds * masks * val, "training_example_forwards": None,
               "budget": self.config.ablation_budget}
        if self.total_steps is not None and self.step_examples is not None:
            out["training_example_forwards"] = 2 * self.total_steps * self.step_examples
        return out

    def max_rounds(self) -> int:
        """``n_rounds``, capped by ``ablation_budget`` when the run's length and examples per step are
        known (at least one round when ``n_rounds >= 1``)."""
        n = int(self.config.n_rounds)
        budget = self.config.ablation_budget
        if n == 0 or budget is None or self.total_steps is None or self.step_examples is None:
            return n
        per_round = (1 + 2 * sum(int(a.r_init) for a in self.adapters)) * self._val_size()
        training = 2 * self.total_steps * self.step_examples
        return min(n, max(1, int(budget * training // per_round)))

    # ------------------------------------------------------------------------------ schedule
    def _schedule(self) -> tuple[int, int]:
        if self.k1 is None:
            if isinstance(self.config.k1, float) or isinstance(self.config.k2, float):
                raise ConfigError("k1/k2 are fractions of the run but total_steps is unknown: pass total_steps "
                                  "in the config, call set_total_steps(T), or train with the Trainer callback")
            return max(1, int(self.config.k1)), max(1, int(self.config.k2))
        return self.k1, self.k2

    def is_round(self, t: int) -> bool:
        """Whether step ``t`` runs a round given the rounds already done."""
        if self.rounds_done >= self.max_rounds():
            return False
        if self.last_round_step is not None and t <= self.last_round_step:
            return False
        k1, k2 = self._schedule()
        done = t + 1
        if done < k1 or (done - k1) % k2:
            return False
        return self.total_steps is None or done + k2 <= self.total_steps

    def planned_rounds(self) -> list[int]:
        """Steps ``t`` of every round of a run from the start (needs the total steps; capped by
        :meth:`max_rounds`)."""
        return self._scheduled_rounds(self.max_rounds())

    def _scheduled_rounds(self, n_rounds: int) -> list[int]:
        k1, k2 = self._schedule()
        out = []
        for j in range(n_rounds):
            done = k1 + j * k2
            if self.total_steps is not None and done + k2 > self.total_steps:
                break
            out.append(done - 1)
        return out

    # ------------------------------------------------------------------------------ rounds
    def compute_scores(self, model: nn.Module) -> list[torch.Tensor]:
        """AB-LoRA scores of every active rank on the validation batch (NaN at inactive slots)."""
        self._require_batch()
        return ablation_scores(model, self.adapters, self.val_batch, chunk=self.config.ablation_chunk,
                               loss_fn=self.loss_fn, prefix_reuse=self.config.prefix_reuse, progress=self.progress)

    def _require_batch(self) -> None:
        if self.val_batch is None:
            raise RuntimeError("ALoRA needs a held-out validation batch before its first round: call "
                               "handle.allocator.set_validation_batch(batch) with a dict of tensors "
                               "(input_ids, attention_mask, labels, …) before training")

    def on_step(self, t, optimizer=None, *, importance=None, model=None):
        if not self.is_round(t):
            return []
        self._require_batch()
        if model is None:
            raise RuntimeError("ALoRA rounds need the model: call handle.step(optimizer), which passes it")
        t0 = time.perf_counter()
        scores = self.compute_scores(model)
        self.round_seconds.append(round(time.perf_counter() - t0, 3))
        active = active_on_host(self.adapters)  # one read of the masks; the plan is made on the host
        prune, grow = plan_round(scores, active, [a.capacity for a in self.adapters],
                                 n_a=self.n_a, min_rank=self.config.min_rank, keep_budget=self.config.keep_budget)
        events = apply_rank_changes(step=t, names=self.names, adapters=self.adapters, prune=prune, grow=grow,
                                    seed=self.config.seed, optimizer=optimizer, importance=None, scores=scores,
                                    active=active)
        n_pruned = sum(len(v) for v in prune.values())
        n_grown = sum(grow.values())
        self.pruned_total += n_pruned
        self.grown_total += n_grown
        self.budget_lost += n_pruned - n_grown
        self.rounds_done += 1
        self.last_round_step = int(t)
        self.round_steps.append(int(t))
        self.last_scores = scores
        return events

    # ------------------------------------------------------------------------------ state
    def state_dict(self):
        return {**super().state_dict(), "rounds_done": self.rounds_done, "last_round_step": self.last_round_step,
                "round_steps": list(self.round_steps), "pruned_total": self.pruned_total,
                "grown_total": self.grown_total, "budget_lost": self.budget_lost, "n_a": self.n_a,
                "step_examples": self.step_examples, "round_seconds": list(self.round_seconds)}

    def load_state_dict(self, state):
        if state.get("total_steps") is not None:
            self.set_total_steps(state["total_steps"])
        self.rounds_done = int(state.get("rounds_done", 0))
        lrs = state.get("last_round_step")
        self.last_round_step = None if lrs is None else int(lrs)
        self.round_steps = [int(x) for x in state.get("round_steps", [])]
        self.pruned_total = int(state.get("pruned_total", 0))
        self.grown_total = int(state.get("grown_total", 0))
        self.budget_lost = int(state.get("budget_lost", 0))
        self.n_a = int(state.get("n_a", self.n_a))
        se = state.get("step_examples")
        if se is not None and self.step_examples is None:
            self.step_examples = int(se)
        self.round_seconds = [float(x) for x in state.get("round_seconds", [])]
