"""The allocation interface and the one mechanism every policy uses to change ranks.

A *policy* (one small module per method) only decides which rank slots to switch off and which
matrices get new ranks. :func:`apply_rank_changes` carries the decision out, identically for every
method:

* pruned slots are deactivated (parameters zeroed, mask off), their EMA state and optimizer moments
  zeroed;
* grown slots are taken from the matrix's inactive slots, initialised by the adapter (orthogonal
  unit vectors, λ = 0, drawn from a generator seeded from ``(seed, step, module index)`` so every
  process draws the same numbers), and start with zero EMA state and zero optimizer moments;
* nothing else is touched: kept ranks keep their optimizer state bit-for-bit, parameter objects and
  shapes never change, the LR scheduler and param groups are never touched.

Host and device (docs/large_models.md): policies decide on the host, from one copy of the score table
and the masks (:func:`active_on_host`, ``ImportanceTracker.round_table``). :func:`apply_rank_changes`
then reads the parameters that new ranks are orthogonalised against in one transfer, computes the new
vectors on the host, and sends every index and vector of the round to the device in one transfer:
a round costs a fixed number of device synchronisations, whatever the number of matrices.

Imports: :mod:`elalora.layers` (and :mod:`elalora.importance` for type hints only).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

from ..layers import ElasticAdapter, adapter_param_count, edit_, to_device, to_host

if TYPE_CHECKING:  # pragma: no cover
    from ..importance import ImportanceTracker

__all__ = ["RankEvent", "Allocator", "apply_rank_changes", "slot_generator", "zero_optimizer_slots", "rank_cost",
           "active_on_host"]


def rank_cost(adapter: ElasticAdapter) -> int:
    """Parameters of one rank of ``adapter`` (``d_in + d_out``, plus 1 for λ on the SVD form): the unit
    of the parameter budget (``budget="params"``)."""
    return adapter_param_count(adapter.form, 1, adapter.in_features, adapter.out_features)


@dataclass
class RankEvent:
    """One module's rank change in one round (``scores``: its active ranks' scores before the change)."""

    step: int
    module: str
    old_rank: int
    new_rank: int
    pruned: int = 0
    grown: int = 0
    scores: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def slot_generator(seed: int, step: int, module_index: int) -> torch.Generator:
    """A CPU generator that depends only on ``(seed, step, module_index)``.

    Every DDP replica, and a resumed run, draws the same vectors for the same round without any
    communication and without touching the global RNG.
    """
    mixed = (seed * 0x9E3779B1 + step * 0x85EBCA77 + module_index * 0xC2B2AE3D + 0x27D4EB2F) % (2**63 - 1)
    g = torch.Generator(device="cpu")
    g.manual_seed(mixed)
    return g


def active_on_host(adapters: Sequence[ElasticAdapter]) -> list[torch.Tensor]:
    """Host copies of every adapter's active mask, in one transfer per device."""
    return to_host([a.active for a in adapters])


@torch.no_grad()
def zero_optimizer_slots(optimizer: torch.optim.Optimizer | None, adapter: ElasticAdapter, slots: Sequence[int],
                         *, idx: torch.Tensor | None = None) -> None:
    """Zero every per-element optimizer state tensor (Adam's ``exp_avg``, ``exp_avg_sq``, momentum
    buffers, …) at ``slots`` of ``adapter``; scalar state such as Adam's ``step`` is left alone.
    ``idx``: the same slots as a long tensor already on the adapter's device (no upload)."""
    if optimizer is None or not len(slots):
        return
    for _, p, dim in adapter.slot_parameters():
        st = optimizer.state.get(p)
        if not st:
            continue
        for v in st.values():
            if torch.is_tensor(v) and v.shape == p.shape:
                at = idx if idx is not None else torch.as_tensor([int(s) for s in slots], dtype=torch.long,
                                                                 device=v.device)
                # edit_: optimizer state of an FSDP2-sharded parameter is sharded alike (a DTensor).
                edit_(v, lambda t, dim=dim, at=at: t.index_fill_(dim, at.to(t.device), 0))


def apply_rank_changes(
    *,
    step: int,
    names: Sequence[str],
    adapters: Sequence[ElasticAdapter],
    prune: dict[int, list[int]],
    grow: dict[int, int],
    seed: int,
    optimizer: torch.optim.Optimizer | None = None,
    importance: "ImportanceTracker | None" = None,
    scores: Sequence[torch.Tensor] | None = None,
    active: list[torch.Tensor] | None = None,
) -> list[RankEvent]:
    """Prune ``prune[m]`` (slot indices) and add ``grow[m]`` new ranks to matrix ``m``.

    Pruning happens first, so a matrix that loses and gains ranks in one round can reuse the freed
    slots. Returns one :class:`RankEvent` per matrix whose rank or slots changed.

    ``active``: host copies of the masks (:func:`active_on_host`), updated here in place to the masks
    after the round; read from the device when not given. ``scores``: host tensors.

    Transfers (module docstring): one read of the grown matrices' parameters, one write of every index
    and new vector; the edits themselves are device-side ops on slices of that one upload.
    """
    touched = sorted(set(prune) | {m for m, n in grow.items() if n > 0})
    if not touched:
        return []
    if active is None:
        active = active_on_host(adapters)
    # 1. the plan, on the host: which slots die, which are born (the first free ones after pruning)
    plan = []
    for m in touched:
        a, mask = adapters[m], active[m].numpy()
        old = int(mask.sum())
        act_scores = [float(x) for x in scores[m].numpy()[mask]] if scores is not None else []
        dead = [int(s) for s in prune.get(m, [])]
        mask[dead] = False
        n_new = int(grow.get(m, 0))
        born: list[int] = []
        if n_new:
            free = (~mask).nonzero()[0].tolist()  # numpy
            if n_new > len(free):
                raise RuntimeError(f"{names[m]}: cannot add {n_new} ranks, only {len(free)} free slots "
                                   f"(capacity {a.capacity})")
            born = free[:n_new]
        plan.append((m, old, act_scores, dead, born))
    # 2. new ranks, on the host, from one read of the grown matrices' parameters (masks after pruning)
    grown = [(m, born) for m, _, _, _, born in plan if born]
    reads: list[torch.Tensor] = []
    layout = []
    for m, _ in grown:
        keys, ts = adapters[m].slot_state_tensors()
        layout.append((len(reads), keys[1:]))
        reads += ts[1:]
    host = to_host(reads)
    values: dict[int, dict[str, torch.Tensor]] = {}
    for (m, born), (at, keys) in zip(grown, layout):
        state = {"active": active[m], **dict(zip(keys, host[at:at + len(keys)]))}
        values[m] = adapters[m].new_slot_values(born, slot_generator(seed, step, m), state)
        active[m].numpy()[born] = True
    # 3. one upload of every index and vector, then device-side edits
    ups: list[torch.Tensor] = []
    devs: list[torch.device] = []
    where = {}
    for m, _, _, dead, born in plan:
        dev = adapters[m].active.device
        entry = {"dead": len(ups)}
        ups.append(torch.as_tensor(dead, dtype=torch.long, device="cpu"))
        entry["changed"] = len(ups)
        ups.append(torch.as_tensor(dead + born, dtype=torch.long, device="cpu"))
        entry["born"] = len(ups)
        ups.append(torch.as_tensor(born, dtype=torch.long, device="cpu"))
        devs += [dev] * 3
        if m in values:
            entry["values"] = {}
            for k, v in values[m].items():
                entry["values"][k] = len(ups)
                ups.append(v)
                devs.append(dev)
        where[m] = entry
    dev_t = to_device(ups, devs)
    events: list[RankEvent] = []
    for m, old, act_scores, dead, born in plan:
        a, e = adapters[m], where[m]
        a.deactivate(dead, idx=dev_t[e["dead"]])
        if born:
            a.write_slots(dev_t[e["born"]], {k: dev_t[i] for k, i in e["values"].items()})
        changed = dead + born
        zero_optimizer_slots(optimizer, a, changed, idx=dev_t[e["changed"]])
        if importance is not None:
            importance.reset_slots(m, changed, idx=dev_t[e["changed"]])
        events.append(RankEvent(step=step, module=names[m], old_rank=old, new_rank=int(active[m].numpy().sum()),
                                pruned=len(dead), grown=len(born), scores=act_scores))
    return events


def no_information(scores: Sequence[torch.Tensor], step: int) -> bool:
    """True (with a warning) when every rank score is exactly 0: the gradients the scores came from
    were all zero (``zero_grad(set_to_none=False)`` before ``handle.step``), so a round would rank
    ties. The caller then skips the round."""
    if any(s.numpy().any() for s in scores):  # host scores: numpy reads, no tensor op
        return False
    import warnings

    warnings.warn(f"rank-allocation round at step {step} skipped: every importance score is 0 (were the gradients "
                  "zeroed before handle.step()? call it between optimizer.step() and optimizer.zero_grad())",
                  RuntimeWarning, stacklevel=3)
    return True


class Allocator:
    """A rank-allocation policy. Subclasses implement :meth:`on_step`.

    The integration layer calls :meth:`on_step` exactly once per optimizer step ``t`` (0-based),
    between ``optimizer.step()`` and ``zero_grad()``.
    """

    method = "abstract"
    uses_importance = False

    def __init__(self, names: Sequence[str], adapters: Sequence[ElasticAdapter], config) -> None:
        self.names = list(names)
        self.adapters = list(adapters)
        self.config = config
        self.total_steps: int | None = None

    def set_total_steps(self, total_steps: int) -> None:
        self.total_steps = int(total_steps)

    def on_step(self, t: int, optimizer=None, *, importance=None, model=None) -> list[RankEvent]:
        raise NotImplementedError

    def wants_importance(self, t: int) -> bool:
        """Whether the importance EMA must be updated at step ``t``."""
        return False

    def state_dict(self) -> dict:
        return {"total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        self.total_steps = state.get("total_steps")
