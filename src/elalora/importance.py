"""Sensitivity × uncertainty importance scores (AdaLoRA eqs. 8–11; ElaLoRA §3.2; SPEC §2).

Once per optimizer step, after ``optimizer.step()`` and before the gradients are cleared, for every
element ``w`` of P, λ, Q (post-step value, with the gradient that produced the step)::

    I(t) = |w · ∂L/∂w|
    Ī(t) = β1 Ī(t−1) + (1 − β1) I(t)                 (sensitivity EMA)
    Ū(t) = β2 Ū(t−1) + (1 − β2) |I(t) − Ī(t)|        (uncertainty EMA, with the new Ī)
    s(w) = Ī(t) · Ū(t)

and the score of rank ``i`` of one matrix is ``S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)``.

How it is computed (the update is memory-bound, so the point is to touch memory as little as
possible):

* Only Ī and Ū are state (two copies of the adapter parameters; PEFT also keeps ``I``). Adapters
  whose parameters have the same shapes, dtype and device form a *group*; the group's Ī (and Ū) is
  one ``(n_adapters × row)`` tensor, a row holding one adapter's P, λ, Q back to back. ``sens`` and
  ``unc`` are per-parameter views into those tensors (same order as ``slot_parameters()``).
* A step walks each group in chunks of ~2 MiB (``CPU_CHUNK_ELEMENTS``). Per chunk, ``I = |w·g|`` is
  written into a small reusable scratch buffer (one ``mul`` per parameter), and the EMA updates run
  as a few cheap ops on the chunk's contiguous slices while they are still in cache (no ``lerp``,
  which is slow on the CPU; no per-step allocation, no zero tensors for missing gradients). Main
  memory sees about one read of w and g and one read and write of Ī and Ū per step, and the number
  of kernel launches (and of OpenMP parallel regions, costly on a busy machine) is per chunk, not
  per tensor and op.
* In the same pass the per-rank score sums ``S_i`` are recomputed for the chunk (a product and two
  sums, in cache), so an allocation round only reads ``n_adapters × capacity`` cached numbers:
  :meth:`rank_scores` (and :meth:`round_table`, which adds the active masks) costs one small transfer
  per device for all groups (:func:`~elalora.layers.to_host`), and :meth:`reset_slots` keeps the
  cache exact with device-side ops.
* FSDP2 (sharded DTensor parameters): :meth:`update` gathers every adapter parameter and gradient, so
  the state is whole and identical on every process and decisions need no further agreement; the
  tracker re-reads the adapters' parameter attributes each step, since ``fully_shard`` swaps them.
* Non-finite gradients are detected before anything is written (one norm per gradient, one host
  sync per device: the only sync of an ordinary step), so a skipped fp16 step changes nothing.

The update uses ``I − Ī(t) = β1 (I − Ī(t−1))``, which is exact algebra, so the state equals the
straightforward formula up to rounding (a few ulp); ``tests/test_importance_fused.py`` pins the
state and the per-rank scores to the reference formula. A ``torch.compile`` (inductor) fused kernel
was tried and not kept: on the 7B layout it was only ~10% faster than this eager path (1 thread)
and costs seconds of compilation per distinct shape (``docs/results.md``).

Imports: torch and :mod:`elalora.layers` only.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .layers import ElasticAdapter, full_tensor, is_dtensor, to_host

__all__ = ["ImportanceTracker"]

# Elements per chunk and buffer. On the CPU a chunk's working set (I scratch, Ī, Ū slices) should stay
# in cache between the element-wise passes; on accelerators bigger chunks amortise kernel launches.
CPU_CHUNK_ELEMENTS = 1 << 19
DEVICE_CHUNK_ELEMENTS = 1 << 24



def _count_nonfinite(gs: list[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """How many of ``gs`` hold a NaN or inf, as a 0-dim float32 tensor on their device (no host read):
    one norm per tensor, since inf and NaN propagate through it."""
    if not gs:
        return torch.zeros((), dtype=torch.float32, device=device)
    try:
        norms = torch._foreach_norm(gs)
    except (RuntimeError, TypeError, NotImplementedError):  # pragma: no cover  (old backends)
        norms = [g.abs().max() for g in gs]
    return (~torch.isfinite(torch.stack([n.float() for n in norms]))).sum(dtype=torch.float32)

class _Group:
    """Adapters with identical parameter shapes (and dtype, device): one row each in ``sens``/``unc``."""

    def __init__(self, adapter_ids: list[int], shapes: list[torch.Size], dims: list[int], capacity: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.adapter_ids = adapter_ids
        self.shapes = shapes
        self.dims = dims
        self.capacity = capacity
        self.dtype = dtype
        self.device = device
        self.numels = [int(torch.Size(s).numel()) for s in shapes]
        self.offsets = []
        off = 0
        for n in self.numels:
            self.offsets.append(off)
            off += n
        self.row = off
        n = len(adapter_ids)
        self.sens = torch.zeros(n, self.row, dtype=dtype, device=device)
        self.unc = torch.zeros(n, self.row, dtype=dtype, device=device)
        self.sums = torch.zeros(n, capacity, dtype=torch.float32, device=device)  # per-rank S_i
        chunk = CPU_CHUNK_ELEMENTS if device.type == "cpu" else DEVICE_CHUNK_ELEMENTS
        self.rows_per_chunk = max(1, min(n, chunk // max(self.row, 1)))
        self.chunks: list[tuple[int, int, list[tuple[int, torch.Tensor]], torch.Tensor]] = []

    def part(self, buf: torch.Tensor, j: int, rows: int) -> torch.Tensor:
        """Parameter ``j`` of ``rows`` consecutive adapters of a ``(rows × row)`` slice: ``(rows, *shape)``."""
        return buf[:, self.offsets[j]:self.offsets[j] + self.numels[j]].view(rows, *self.shapes[j])


class ImportanceTracker:
    """EMA importance state for a list of SVD adapters.

    Args:
        adapters: the adapters, in a fixed order (the order is the module index everywhere).
        beta1, beta2: EMA coefficients for sensitivity and uncertainty.

    Public state: ``sens`` (Ī) and ``unc`` (Ū), lists of per-parameter tensors in the order
    ``[P_0, λ_0, Q_0, P_1, ...]`` (views into the grouped storage; ``None`` until the first update).
    """

    def __init__(self, adapters: Sequence[ElasticAdapter], beta1: float = 0.85, beta2: float = 0.85) -> None:
        self.adapters = list(adapters)
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        # Flat parameter list: [P_0, λ_0, Q_0, P_1, λ_1, Q_1, ...], the slot axis of each, and the
        # flat index range of every adapter.
        self._params: list[torch.Tensor] = []
        self._slot_dims: list[int] = []
        self._spans: list[tuple[int, int]] = []
        for a in self.adapters:
            start = len(self._params)
            for _, p, dim in a.slot_parameters():
                self._params.append(p)
                self._slot_dims.append(dim)
            self._spans.append((start, len(self._params)))
        self.sens: list[torch.Tensor] | None = None  # Ī
        self.unc: list[torch.Tensor] | None = None   # Ū
        self._groups: list[_Group] = []
        self._where: list[tuple[int, int]] = []      # adapter -> (group, row)
        self._scratch: dict[tuple, torch.Tensor] = {}
        self._sums_valid = False                     # group.sums hold S_i of the current state
        self._cpu_scores: list[torch.Tensor] | None = None
        self.num_updates = 0
        self.num_skipped = 0

    # Setting ``_scores = None`` (as code that edits ``sens``/``unc`` in place does) invalidates every
    # cached score, so the next :meth:`rank_scores` recomputes them from the state.
    @property
    def _scores(self) -> list[torch.Tensor] | None:
        return self._cpu_scores

    @_scores.setter
    def _scores(self, value) -> None:
        self._cpu_scores = value
        if value is None:
            self._sums_valid = False

    # --------------------------------------------------------------------------------- state
    def _layout_key(self, i: int) -> tuple:
        lo, hi = self._spans[i]
        ps = self._params[lo:hi]
        dtypes = {p.dtype for p in ps}
        devices = {p.device for p in ps}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(f"adapter {i}: its slot parameters must share one dtype and device; got "
                             f"{sorted(map(str, dtypes))} on {sorted(map(str, devices))}")
        return (tuple((tuple(p.shape), d) for p, d in zip(ps, self._slot_dims[lo:hi])), ps[0].dtype, ps[0].device)

    def _build(self, old_sens: list[torch.Tensor] | None = None, old_unc: list[torch.Tensor] | None = None) -> None:
        """(Re)create the grouped storage for the parameters' current shapes, dtype and device."""
        by_key: dict[tuple, list[int]] = {}
        for i in range(len(self.adapters)):
            by_key.setdefault(self._layout_key(i), []).append(i)
        self._groups, self._where = [], [(0, 0)] * len(self.adapters)
        sens: list[torch.Tensor | None] = [None] * len(self._params)
        unc: list[torch.Tensor | None] = [None] * len(self._params)
        for gid, ((spec, dtype, device), ids) in enumerate(by_key.items()):
            shapes = [torch.Size(s) for s, _ in spec]
            dims = [d for _, d in spec]
            cap = int(shapes[0][dims[0]])
            g = _Group(ids, shapes, dims, cap, dtype, device)
            self._groups.append(g)
            for row, i in enumerate(ids):
                self._where[i] = (gid, row)
                lo, _ = self._spans[i]
                for j in range(len(shapes)):
                    sens[lo + j] = g.part(g.sens[row:row + 1], j, 1)[0]
                    unc[lo + j] = g.part(g.unc[row:row + 1], j, 1)[0]
        self.sens, self.unc = sens, unc  # type: ignore[assignment]
        if old_sens is not None:
            for s, o in zip(self.sens, old_sens):
                s.copy_(o)
            for u, o in zip(self.unc, old_unc):
                u.copy_(o)
        # Scratch for I, one per (dtype, device), sized for the largest chunk; chunk views into it.
        need: dict[tuple, int] = {}
        for g in self._groups:
            key = (g.dtype, g.device)
            need[key] = max(need.get(key, 0), g.rows_per_chunk * g.row)
        self._scratch = {k: torch.empty(n, dtype=k[0], device=k[1]) for k, n in need.items()}
        for g in self._groups:
            buf = self._scratch[(g.dtype, g.device)]
            g.chunks = []
            n = len(g.adapter_ids)
            for i0 in range(0, n, g.rows_per_chunk):
                i1 = min(n, i0 + g.rows_per_chunk)
                x = buf[: (i1 - i0) * g.row].view(i1 - i0, g.row)
                items = []
                for r, i in enumerate(g.adapter_ids[i0:i1]):
                    lo, _ = self._spans[i]
                    for j in range(len(g.shapes)):
                        items.append((lo + j, g.part(x[r:r + 1], j, 1)[0]))
                g.chunks.append((i0, i1, items, x))
        self._sums_valid = False
        self._cpu_scores = None

    def _stale(self) -> bool:
        for g in self._groups:
            p = self._params[self._spans[g.adapter_ids[0]][0]]
            if p.device != g.device or p.dtype != g.dtype:
                return True
        return False

    def _refresh_params(self) -> None:
        """Follow parameter objects that were swapped under the adapters after the tracker was built:
        FSDP2's ``fully_shard`` replaces every parameter with a sharded DTensor parameter of the same
        (global) shape, so the tracker must read the module's current attributes, not its first list."""
        i = 0
        for a in self.adapters:
            for _, p, _ in a.slot_parameters():
                if self._params[i] is not p:
                    self._params[i] = p
                i += 1

    def _ensure_state(self) -> None:
        self._refresh_params()
        if self.sens is None:
            self._build()
        elif self._stale():  # the model moved (e.g. .to("cuda") after wrapping): follow it
            self._build([s.detach().clone() for s in self.sens], [u.detach().clone() for u in self.unc])

    def state_dict(self) -> dict:
        return {
            "sens": None if self.sens is None else [s.detach().cpu().clone() for s in self.sens],
            "unc": None if self.unc is None else [u.detach().cpu().clone() for u in self.unc],
            "num_updates": self.num_updates,
            "num_skipped": self.num_skipped,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("sens") is None:
            self.sens = self.unc = None
            self._groups, self._scratch = [], {}
        else:
            if len(state["sens"]) != len(self._params):
                raise ValueError(
                    f"importance state holds {len(state['sens'])} tensors but the model has {len(self._params)} "
                    "adapter parameters: the checkpoint comes from a different adapter layout")
            for s, p in zip(state["sens"], self._params):
                if s.shape != p.shape:
                    raise ValueError(f"importance state shape {tuple(s.shape)} "
                                     f"does not match parameter {tuple(p.shape)}")
            self.sens = None
            self._build(list(state["sens"]), list(state["unc"]))
        self.num_updates = int(state.get("num_updates", 0))
        self.num_skipped = int(state.get("num_skipped", 0))
        self._sums_valid = False
        self._cpu_scores = None

    # -------------------------------------------------------------------------------- update
    @staticmethod
    def _grads_finite(grads: list[torch.Tensor], others: Sequence[torch.Tensor] = ()) -> bool:
        """All gradients finite? One norm per tensor (inf and NaN propagate), one host read per device.

        ``others`` may be sharded DTensors (FSDP2 gradients of the modules trained in full): they are checked
        on each process's local shard, and the per-process count of non-finite shards is summed over the
        shards' mesh (one small all-reduce per mesh dimension), never gathered whole: every process then
        reaches the same verdict from the same total.
        """
        by_dev: dict[torch.device, list[torch.Tensor]] = {}
        sharded: list[torch.Tensor] = []
        for g in grads:  # the adapters' gradients: whole tensors here (update() gathers sharded ones)
            by_dev.setdefault(g.device, []).append(g)
        for g in others:
            if is_dtensor(g):
                sharded.append(g)
            else:
                by_dev.setdefault(g.device, []).append(g)
        flags = {dev: _count_nonfinite(gs) for dev, gs in by_dev.items()}
        if sharded:
            import torch.distributed as dist

            local = [g.to_local() for g in sharded]
            dev = local[0].device
            bad = _count_nonfinite([t for t in local if t.numel()], dev)
            meshes = {id(g.device_mesh): g.device_mesh for g in sharded}
            for mesh in meshes.values():
                for d in range(mesh.ndim):
                    dist.all_reduce(bad, op=dist.ReduceOp.SUM, group=mesh.get_group(d))
            flags[dev] = flags[dev] + bad if dev in flags else bad
        # one read per device (a sync on an accelerator), as the step's only one
        return not any(bool(f) for f in flags.values())

    def _chunk_sums(self, g: _Group, i0: int, i1: int, x: torch.Tensor) -> None:
        """``g.sums[i0:i1] = S_i`` from the state rows ``i0:i1`` (``x``: a ``(i1−i0) × row`` scratch)."""
        rows = i1 - i0
        torch.mul(g.sens[i0:i1], g.unc[i0:i1], out=x)            # s(w) = Ī · Ū
        out = g.sums[i0:i1]
        for j, dim in enumerate(g.dims):
            part = g.part(x, j, rows)
            red = [d + 1 for d in range(len(g.shapes[j])) if d != dim]
            if red:
                m = part.sum(dim=red) if part.dtype == torch.float32 else part.sum(dim=red, dtype=torch.float32)
                m.div_(part[0].numel() // g.capacity)
            else:
                m = part.float()
            if j == 0:
                out.copy_(m)
            else:
                out.add_(m)

    @torch.no_grad()
    def update(self, other_grads: Sequence[torch.Tensor] = ()) -> bool:
        """One EMA step from the current parameters and gradients.

        Returns ``False`` (and changes nothing) when any adapter gradient, or any of ``other_grads``, is
        non-finite, i.e. on an fp16 step that the grad scaler skipped. ``other_grads``: the gradients of the
        optimizer's other parameters (a classifier trained in full): the scaler skips the step when any of
        them overflows, even if every adapter gradient is finite. Parameters whose gradient is ``None``
        contribute ``I = 0`` (an adapter that took no part in this step's loss).
        """
        self._ensure_state()
        params = self._params
        grads = [p.grad for p in params]
        if any(is_dtensor(p) for p in params):
            # FSDP2: parameters and their (reduce-scattered) gradients are sharded DTensors. The state is
            # kept whole and identical on every process: gather both (one all-gather each; adapters are
            # small next to the base), so scores and decisions equal a one-process run's.
            params = [full_tensor(p.detach()) for p in params]
            grads = [None if g is None else full_tensor(g) for g in grads]
        present = [g for g in grads if g is not None]
        others = [g for g in other_grads if g is not None]
        if (present or others) and not self._grads_finite(present, others):
            self.num_skipped += 1
            return False
        b1, b2 = self.beta1, self.beta2
        w1, w2 = 1.0 - b1, 1.0 - b2
        for g in self._groups:
            for i0, i1, items, x in g.chunks:
                for k, view in items:                               # I = |w · ∂L/∂w| (0 without grad)
                    gr = grads[k]
                    if gr is None:
                        view.zero_()
                    else:
                        torch.mul(params[k], gr, out=view)
                s, u = g.sens[i0:i1], g.unc[i0:i1]
                x.abs_().sub_(s)                                    # d = I − Ī(t−1)
                s.add_(x, alpha=w1)                                 # Ī ← Ī + (1−β1) d = β1 Ī + (1−β1) I
                x.abs_()                                            # |I − Ī(t)| = β1 |d|
                u.mul_(b2).add_(x, alpha=w2 * b1)                   # Ū ← β2 Ū + (1−β2) β1 |d|
                self._chunk_sums(g, i0, i1, x)                      # S_i, while the rows are in cache
        self._sums_valid = True
        self._cpu_scores = None
        self.num_updates += 1
        return True

    # -------------------------------------------------------------------------------- scores
    @torch.no_grad()
    def _recompute_sums(self) -> None:
        for g in self._groups:
            for i0, i1, _, x in g.chunks:
                self._chunk_sums(g, i0, i1, x)
        self._sums_valid = True

    @torch.no_grad()
    def rank_scores(self) -> list[torch.Tensor]:
        """Per-rank score ``S_i`` of every adapter (length = capacity; fp32, on the CPU).

        Kept current by :meth:`update`, so this costs one small device-to-host copy per device.
        """
        return self.round_table(masks=False)[0]

    @torch.no_grad()
    def round_table(self, masks: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """``(S_i per adapter, active mask per adapter)`` on the host, read in one transfer per device
        (the masks only with ``masks=True``): what an allocation round decides from."""
        mask_src = [a.active for a in self.adapters] if masks else []
        if self._cpu_scores is not None:
            return self._cpu_scores, (to_host(mask_src) if masks else None)
        if self.sens is None:
            self._cpu_scores = [torch.zeros(a.capacity, device="cpu") for a in self.adapters]
            return self._cpu_scores, (to_host(mask_src) if masks else None)
        if not self._sums_valid:
            self._recompute_sums()
        host = to_host([g.sums for g in self._groups] + mask_src)
        rows = [h.unbind(0) for h in host[:len(self._groups)]]
        self._cpu_scores = [rows[gid][row] for gid, row in self._where]
        return self._cpu_scores, (host[len(self._groups):] if masks else None)

    @torch.no_grad()
    def reset_slots(self, adapter_index: int, slots: Sequence[int], *, idx: torch.Tensor | None = None) -> None:
        """Zero the EMA state of ``slots`` of one adapter (pruned or newly activated ranks). ``idx``: the
        same slots as a long tensor on the state's device (no upload)."""
        slots = [int(s) for s in slots]
        if self.sens is None or not slots:
            return
        lo, hi = self._spans[adapter_index]
        for k in range(lo, hi):
            dim = self._slot_dims[k]
            if idx is None or idx.device != self.sens[k].device:
                idx = torch.as_tensor(slots, dtype=torch.long, device=self.sens[k].device)
            self.sens[k].index_fill_(dim, idx, 0.0)
            self.unc[k].index_fill_(dim, idx, 0.0)
        # Zeroed state has S_i = 0 exactly: patch the caches instead of recomputing them.
        gid, row = self._where[adapter_index]
        if self._sums_valid:
            self._groups[gid].sums[row].index_fill_(0, idx, 0.0)
        if self._cpu_scores is not None:
            fixed = self._cpu_scores[adapter_index].clone()
            fixed[torch.as_tensor(slots, dtype=torch.long, device="cpu")] = 0.0
            self._cpu_scores = list(self._cpu_scores)
            self._cpu_scores[adapter_index] = fixed

    def state_bytes(self) -> int:
        """Bytes of allocator state (Ī and Ū; the cached per-rank sums and the chunk scratch are
        ``O(ranks)`` and ``O(chunk)``, not ``O(adapter parameters)``, and are not counted)."""
        if self.sens is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self.sens + self.unc)
