"""Elastic adapter layers: the layer maths, and nothing else.

Two forms share one interface (:class:`ElasticAdapter`):

* :class:`SVDAdapter` (ElaLoRA, AdaLoRA; Zhang et al. 2023, arXiv:2303.10512 eq. 1;
  Chang et al. 2025, arXiv:2504.00254 §3)::

      y = x W0ᵀ + b + dropout(x) · (Q ⊙ (λ·m))ᵀ · Pᵀ · s,      s = lora_alpha / r_init

  ``P: d_out × c``, ``λ: c``, ``Q: c × d_in`` with ``c`` the *capacity* (maximum rank) and
  ``m ∈ {0,1}^c`` the *active mask*.

* :class:`GatedLoRAAdapter` (the LoRA form: ALoRA, and ElaLoRA / AdaLoRA with ``form="lora"``;
  Hu et al. 2021, arXiv:2106.09685; Liu et al. 2024, arXiv:2403.16187 §3)::

      y = x W0ᵀ + b + dropout(x) · Aᵀ · diag(m) · Bᵀ · s,     s = lora_alpha / r_init

A *form* is one adapter class and one entry of :data:`ADAPTER_FORMS` (``{"svd": SVDAdapter, "lora":
GatedLoRAAdapter}``). Everything outside this module asks the class, never the form's name: its
slot parameters and their shapes (:meth:`ElasticAdapter.slot_shapes`), its default ``lora_alpha``
(:meth:`ElasticAdapter.default_alpha`), whether it has an orthogonal regulariser
(``has_orthogonality_penalty``), and ElaLoRA's default grace period for the ranks it grows
(``default_grace_rounds``; the allocation policy reads it through ``ElaLoRAConfig``).

Tensor shapes never change during training: a rank is switched on or off through the mask, so
optimizers, DDP's reducer, LR schedulers and ``torch.compile`` graphs stay valid. An inactive slot
is multiplied by zero in the forward pass, hence receives an exactly-zero gradient; its parameters
are also zeroed on deactivation so that decoupled weight decay leaves them at zero as well.

The scale ``s`` is computed once from the *initial* rank and never changes when ranks are pruned or
added (SPEC §1): that is what makes a rank change function-preserving.

Sharded parameters (FSDP2's ``fully_shard`` turns every parameter into a ``DTensor`` sharded on dim 0)
are supported through two helpers, :func:`full_tensor` and :func:`edit_`: every rank-slot edit
(deactivate, new-rank initialisation, optimizer-state zeroing) gathers the full tensor, edits it the
same way on every process and writes each process's own shard back, in place — the parameter object
and its sharding never change. Inside the forward pass FSDP has already unsharded the parameters, so
the layer maths sees plain tensors.

Devices: every tensor made here names its device (the parameters' device, or ``"cpu"`` for host-side
work such as drawing new ranks). Data crosses between host and device only through :func:`to_host`
and :func:`to_device`, one transfer per device for any number of tensors: on an accelerator each
transfer is a synchronisation, so a rank round batches its reads and its writes (docs/large_models.md;
``tests/test_device.py`` counts them). New ranks are drawn on the host in two steps,
:meth:`ElasticAdapter.new_slot_values` (host maths, from host copies of the parameters) and
:meth:`ElasticAdapter.write_slots` (device writes), so that a round touching many matrices makes one
read and one write in all; :meth:`ElasticAdapter.activate` does both for one adapter.

Holds: the adapter modules, the one rule for a base layer's ``(d_in, d_out)`` (:func:`base_shape`),
the one count of an adapter's parameters per active rank (:func:`adapter_param_count`) and the
host/device transfer helpers.
Imports: torch, transformers and :mod:`elalora.errors` only (level 1, with :mod:`elalora.config`).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from typing import Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import QuantizationError

__all__ = ["ElasticAdapter", "SVDAdapter", "GatedLoRAAdapter", "ADAPTER_FORMS", "adapter_form",
           "SUPPORTED_BASE_LAYERS",
           "base_shape", "adapter_param_count", "full_tensor", "edit_", "is_dtensor", "to_host", "to_device",
           "TRANSFERS"]

SUPPORTED_BASE_LAYERS = (nn.Linear, Conv1D)

#: Transfers made by :func:`to_host` (``"to_host"``) and :func:`to_device` (``"to_device"``), one per device
#: and call: read by the sync-count test and ``benchmarks/gpu_check.py``.
TRANSFERS: Counter = Counter()


def _common_dtype(dtypes: set[torch.dtype]) -> torch.dtype:
    """One dtype that holds every value of ``dtypes`` exactly (bool and float32 in float32, integers
    with floats in float64: indices are far below 2**53)."""
    if len(dtypes) == 1:
        return next(iter(dtypes))
    if not any(d.is_floating_point for d in dtypes):
        return torch.int64
    if torch.float64 in dtypes or any(d != torch.bool and not d.is_floating_point for d in dtypes):
        return torch.float64
    return torch.float32


def _packed(ts: Sequence[torch.Tensor], dev: torch.device) -> list[torch.Tensor]:
    """Copies of ``ts`` (one source device) on ``dev`` in one transfer: flattened, concatenated in a dtype
    that holds them all exactly, moved, split and cast back."""
    common = _common_dtype({t.dtype for t in ts})
    # cat always copies, so the result never aliases the source (also when both are the CPU)
    flat = torch.cat([t.reshape(-1).to(common) for t in ts]).to(dev)  # the one transfer
    return [part.view(t.shape).to(t.dtype) for t, part in zip(ts, torch.split(flat, [t.numel() for t in ts]))]


def _move(tensors: Sequence[torch.Tensor], targets: Sequence[torch.device], key: str) -> list[torch.Tensor]:
    out: list[torch.Tensor | None] = [None] * len(tensors)
    batches: dict[tuple[torch.device, torch.device], list[int]] = {}
    for i, (t, dev) in enumerate(zip(tensors, targets)):
        batches.setdefault((t.device, torch.device(dev)), []).append(i)
    for (src, dev), ids in batches.items():
        ts = [tensors[i].detach() if tensors[i].requires_grad else tensors[i] for i in ids]
        TRANSFERS[key] += 1
        if src.type == "cpu" and dev.type == "cpu":
            # host to host: nothing to synchronise, so no packing (on thousands of small tensors the casts,
            # the cat and the split cost more than plain copies); the same values and the same semantics
            moved = [t.clone() for t in ts]
        else:
            moved = _packed(ts, dev)
        for i, t in zip(ids, moved):
            out[i] = t
    return out  # type: ignore[return-value]


def to_host(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of ``tensors`` on the CPU, in one transfer per source device (a synchronisation on an
    accelerator): flattened, concatenated in a dtype that holds them exactly, split back on the host.
    The one route for intended device→host reads in the library."""
    return _move(tensors, [torch.device("cpu")] * len(tensors), "to_host")


def to_device(tensors: Sequence[torch.Tensor], devices: Sequence[torch.device]) -> list[torch.Tensor]:
    """Copies of the host ``tensors`` on ``devices``, one transfer per target device (the mirror of
    :func:`to_host`)."""
    return _move(tensors, devices, "to_device")


@functools.cache  # looked up once: is_dtensor runs per gradient on every step
def _dtensor_class() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover  (torch built without distributed)
        return None
    return DTensor


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (e.g. a parameter sharded by FSDP2)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole (unsharded) value of ``t``: ``t.full_tensor()`` for a DTensor (an all-gather, so every
    process must call it; differentiable), ``t`` itself otherwise."""
    return t.full_tensor() if is_dtensor(t) else t


@torch.no_grad()
def edit_(t: torch.Tensor, fn) -> None:
    """Apply the in-place edit ``fn`` to ``t``. For a DTensor: ``fn`` edits the gathered full tensor
    (identically on every process, which must all call this) and each process copies its own shard back
    into ``t``'s local tensor, so ``t`` keeps its identity, shape and sharding."""
    if not is_dtensor(t):
        fn(t)
        return
    from torch.distributed.tensor import distribute_tensor

    full = t.full_tensor().clone()
    fn(full)
    # src_data_rank=None: no communication, each process slices its shard out of its own (equal) copy.
    mine = distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=None)
    t.to_local().copy_(mine.to_local())


def _base_shape(base: nn.Module) -> tuple[int, int, bool]:
    """(d_in, d_out, fan_in_fan_out) of a supported base layer.

    bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` are ``nn.Linear`` subclasses whose weight is packed
    (4-bit: a ``(d_in·d_out/2) × 1`` uint8 column): their logical shape is ``in_features`` /
    ``out_features``, never the storage's."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, False
    if isinstance(base, Conv1D):
        # GPT-2 style Conv1D stores its weight as d_in × d_out (y = x W + b).
        d_in, d_out = base.weight.shape
        return d_in, d_out, True
    raise TypeError(
        f"cannot wrap {type(base).__name__}: supported layers are nn.Linear and transformers' Conv1D"
    )


class ElasticAdapter(nn.Module):
    """A frozen base layer plus a low-rank update with ``capacity`` rank slots.

    Subclasses define the slot parameters through :meth:`slot_parameters`, which lists
    ``(name, parameter, slot_dim)``: the axis of each parameter that indexes rank slots.
    """

    form: str = "abstract"  # the registry key (ADAPTER_FORMS); saved as each module's "form"
    #: whether :meth:`orthogonality_penalty` exists (the regulariser ``R`` of SPEC §1; ``orth_reg_weight``)
    has_orthogonality_penalty: bool = False
    #: ``ElaLoRAConfig.grace_rounds`` when the config gives none: rounds in which a newly grown rank is no
    #: candidate. 0 here (the papers' rule, no grace); a form sets its own from evidence.
    default_grace_rounds: int = 0

    @classmethod

    @property
    def kind(self) -> str:
        """The adapter's :attr:`form` (the name before forms had one name; kept for older code)."""
        return self.form
    def slot_shapes(cls, rank: int, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
        """``{parameter name: shape}`` of the slot parameters at ``rank`` slots (as saved: compact)."""
        raise NotImplementedError

    @classmethod
    def default_alpha(cls, initial_rank: int) -> float:
        """The form's ``lora_alpha`` when the config gives none."""
        raise NotImplementedError

    def orthogonality_penalty(self) -> torch.Tensor:
        raise NotImplementedError(f"the {self.form} form has no orthogonal regulariser")

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        r: int,
        capacity: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if r < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        if capacity < max(r, 1):
            raise ValueError(f"capacity must be >= max(r, 1), got capacity={capacity}, r={r}")
        self.base_layer = base_layer
        self.in_features, self.out_features, self.fan_in_fan_out = _base_shape(base_layer)
        self.capacity = int(capacity)
        self.r_init = int(r)
        self.lora_alpha = float(lora_alpha)
        # Fixed for the whole run (SPEC §1); never recomputed from the current rank.
        self.scaling = self.lora_alpha / max(self.r_init, 1)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        w = base_layer.weight
        if dtype is None:
            # Half-precision bases keep fp32 adapters (as PEFT does): small rank-1 updates of
            # bf16 values round away. Quantised bases (bitsandbytes 4-bit uint8 / 8-bit int8 storage)
            # get fp32 adapters too: the storage dtype is not a dtype one can train in.
            dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        elif not dtype.is_floating_point:
            raise ValueError(f"adapter dtype must be a floating point dtype, got {dtype}")
        self._factory = {"device": w.device, "dtype": dtype}
        active = torch.zeros(self.capacity, dtype=torch.bool, device=w.device)
        active[:r] = True
        self.register_buffer("active", active)
        self.merged = False
        self.disabled = False
        self._unmerged_weight: torch.Tensor | None = None
        # Per-example slot gates used by batched ablation (ALoRA); None in normal use.
        self.example_gate: torch.Tensor | None = None

    # ----------------------------------------------------------------- interface for subclasses
    def slot_parameters(self) -> list[tuple[str, nn.Parameter, int]]:
        raise NotImplementedError

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(down, gate, up): ΔW = up · diag(gate) · down · s, with inactive slots zeroed in gate."""
        raise NotImplementedError

    #: the slot parameters new ranks are orthogonalised against (read by :meth:`new_slot_values`)
    _basis_params: tuple[str, ...] = ()

    # ----------------------------------------------------------------------------- rank control
    @property
    def rank(self) -> int:
        """Number of active rank slots."""
        return int(self.active.sum().item())

    def active_indices(self) -> torch.Tensor:
        return torch.nonzero(self.active, as_tuple=False).flatten()

    def inactive_indices(self) -> torch.Tensor:
        return torch.nonzero(~self.active, as_tuple=False).flatten()

    @torch.no_grad()
    def deactivate(self, slots: Sequence[int], *, idx: torch.Tensor | None = None) -> None:
        """Switch ``slots`` off and zero their parameters. Shapes and identities are unchanged.
        ``idx``: the same slots as a long tensor already on the adapter's device (no upload)."""
        self._check_not_merged("deactivate")
        if idx is None:
            idx = torch.as_tensor([int(s) for s in slots], dtype=torch.long, device=self.active.device)
        if idx.numel() == 0:
            return
        self.active[idx] = False
        for _, p, dim in self.slot_parameters():
            edit_(p, lambda t, dim=dim: t.index_fill_(dim, idx.to(t.device), 0.0))

    @torch.no_grad()
    def activate(self, slots: Sequence[int], generator: torch.Generator | None = None) -> None:
        """Switch ``slots`` on, initialised by :meth:`init_slots` (ΔW unchanged)."""
        self._check_not_merged("activate")
        slots = [int(s) for s in slots]
        if not slots:
            return
        host = self.host_slot_state()
        if any(bool(host["active"].numpy()[s]) for s in slots):
            raise ValueError(f"slots {slots} include an already active slot")
        self._init_from_host(slots, generator, host)

    def host_slot_state(self) -> dict[str, torch.Tensor]:
        """Host copies of what :meth:`new_slot_values` reads: the active mask and the parameters new ranks
        are orthogonalised against (gathered if sharded), in one transfer. Read several adapters' at once
        with :func:`to_host` on :meth:`slot_state_tensors`."""
        names, tensors = self.slot_state_tensors()
        return dict(zip(names, to_host(tensors)))

    def slot_state_tensors(self) -> tuple[list[str], list[torch.Tensor]]:
        """``(names, device tensors)`` behind :meth:`host_slot_state`."""
        names = ["active", *self._basis_params]
        return names, [self.active] + [full_tensor(getattr(self, n).detach()) for n in self._basis_params]

    @torch.no_grad()
    def init_slots(self, slots: Sequence[int], generator: torch.Generator | None = None) -> None:
        """Give freshly activated ``slots`` their starting values (ΔW must not change)."""
        self._init_from_host([int(s) for s in slots], generator, self.host_slot_state(), activate=False)

    def _init_from_host(self, slots: list[int], generator, host: dict, activate: bool = True) -> None:
        values = self.new_slot_values(slots, generator, host)
        names = list(values)
        dev = self.active.device
        up = to_device([torch.as_tensor(slots, dtype=torch.long, device="cpu")] + [values[n] for n in names],
                       [dev] * (len(names) + 1))
        self.write_slots(up[0], dict(zip(names, up[1:])), activate=activate)

    def new_slot_values(self, slots: list[int], generator: torch.Generator | None,
                        host: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Host maths of :meth:`init_slots`: ``{parameter name: (len(slots) × dim) fp32 rows}`` for the new
        slots (slot axis first), from :meth:`host_slot_state`'s copies; parameters not listed are zeroed."""
        raise NotImplementedError

    @torch.no_grad()
    def write_slots(self, idx: torch.Tensor, values: dict[str, torch.Tensor], activate: bool = True) -> None:
        """Write :meth:`new_slot_values` (moved to the adapter's device) at the slots ``idx`` (a long tensor
        on the device), zero the other slot parameters there, and switch the slots on."""
        for name, p, dim in self.slot_parameters():
            v = values.get(name)
            if v is None:
                edit_(p, lambda t, dim=dim: t.index_fill_(dim, idx.to(t.device), 0.0))
            else:
                v = v if dim == 0 else v.t()
                edit_(p, lambda t, dim=dim, v=v: t.index_copy_(dim, idx.to(t.device), v.to(t.device, t.dtype)))
        if activate:
            self.active[idx.to(self.active.device)] = True

    def _check_not_merged(self, what: str) -> None:
        if self.merged:
            raise RuntimeError(f"cannot {what} rank slots while the adapter is merged; call unmerge() first")

    # ------------------------------------------------------------------------------------- maths
    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW in the (d_out × d_in) convention, computed in ``dtype``."""
        down, gate, up = self._factors()
        down, gate, up = down.to(dtype), gate.to(dtype), up.to(dtype)
        return (up * gate) @ down * self.scaling

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged:
            return y
        down, gate, up = self._factors()
        h = self.lora_dropout(x).to(down.dtype) @ down.t()  # (..., c)
        if self.example_gate is not None:
            # (batch, c) gates: broadcast over every position of each example.
            g = self.example_gate.to(h.dtype)
            h = h * g.view(g.shape[0], *([1] * (h.dim() - 2)), g.shape[1])
        # The scale rides on the c-sized gate, not on the d_out-sized output.
        h = (h * (gate * self.scaling)) @ up.t()
        return y + (h if h.dtype == y.dtype else h.to(y.dtype))

    # ------------------------------------------------------------------------------ merge/unmerge
    @property
    def quantized(self) -> bool:
        """Whether the base weight is stored quantised (bitsandbytes 4-bit / 8-bit)."""
        return not (self.base_layer.weight.dtype.is_floating_point or self.base_layer.weight.dtype.is_complex)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into the base weight. Idempotent; :meth:`unmerge` restores the weight bit-exactly.

        Not available on a quantised base: W0 + ΔW cannot be stored back in 4 or 8 bits without a
        new quantisation error, so an exact unmerge would be impossible. ``merge_and_unload`` replaces
        the layer with a float ``nn.Linear`` instead (see :func:`elalora.persistence.merge_and_unload`).
        """
        if self.merged:
            return
        if self.quantized:
            raise QuantizationError(
                f"cannot merge in place into a quantised {type(self.base_layer).__name__}: W0 + ΔW does not fit "
                "its 4/8-bit storage. Use merge_and_unload(), which dequantises and returns float nn.Linear "
                "layers, or export_peft() and merge onto a float copy of the base")
        w = self.base_layer.weight
        self._unmerged_weight = w.detach().clone()
        work = torch.promote_types(w.dtype, torch.float32)  # float32 for half weights; float64 stays float64
        delta = self.delta_weight(work)
        if self.fan_in_fan_out:
            delta = delta.t()
        w.copy_((w.to(work) + delta).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` exactly (the pre-merge weight was kept). Idempotent."""
        if not self.merged:
            return
        self.base_layer.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"form={self.form}, in={self.in_features}, out={self.out_features}, "
            f"rank={self.rank}/{self.capacity}, scaling={self.scaling:g}"
        )


class SVDAdapter(ElasticAdapter):
    """``ΔW = P · diag(λ ⊙ m) · Q · s`` (AdaLoRA / ElaLoRA).

    Initialisation (SPEC §1): ``λ = 0``, ``P, Q ~ N(0, 0.02²)`` on the initial active slots, so ΔW = 0
    and the wrapped model's outputs are unchanged. Slots beyond ``r`` start inactive and zero.
    """

    form = "svd"
    has_orthogonality_penalty = True

    @classmethod
    def slot_shapes(cls, rank, in_features, out_features):
        return {"lora_P": (out_features, rank), "lora_lambda": (rank,), "lora_Q": (rank, in_features)}

    @classmethod
    def default_alpha(cls, initial_rank):
        return 16.0  # the authors' GLUE scripts (AdaLoRA's and ElaLoRA's)

    def __init__(self, base_layer: nn.Module, *, r: int, capacity: int, lora_alpha: float,
                 lora_dropout: float = 0.0, dtype: torch.dtype | None = None,
                 init_std: float = 0.02, generator: torch.Generator | None = None) -> None:
        super().__init__(base_layer, r=r, capacity=capacity, lora_alpha=lora_alpha,
                         lora_dropout=lora_dropout, dtype=dtype)
        c, f = self.capacity, self._factory
        self.lora_P = nn.Parameter(torch.zeros(self.out_features, c, **f))
        self.lora_lambda = nn.Parameter(torch.zeros(c, **f))
        self.lora_Q = nn.Parameter(torch.zeros(c, self.in_features, **f))
        with torch.no_grad():
            # Drawn on the CPU in fp32 so that every device and dtype gets the same numbers.
            host = {"generator": generator, "device": "cpu"}
            self.lora_P[:, :r] = torch.randn(self.out_features, r, **host).mul_(init_std).to(**f)
            self.lora_Q[:r] = torch.randn(r, self.in_features, **host).mul_(init_std).to(**f)

    def slot_parameters(self):
        return [("lora_P", self.lora_P, 1), ("lora_lambda", self.lora_lambda, 0), ("lora_Q", self.lora_Q, 0)]

    def _factors(self):
        # full_tensor: a no-op inside the forward pass (FSDP has unsharded the parameters), an
        # all-gather when ΔW is needed from sharded parameters (export, merge).
        lam = full_tensor(self.lora_lambda)
        gate = lam * self.active.to(lam.dtype).to(lam.device)
        return full_tensor(self.lora_Q), gate, full_tensor(self.lora_P)

    _basis_params = ("lora_Q", "lora_P")

    def new_slot_values(self, slots, generator, host):
        """New ranks (SPEC §3): ``q, p ~ N(0, I)`` orthogonalised in fp32 against the active rows
        of Q / columns of P (and against the other new ranks), unit norm, ``λ = 0``: ΔW is unchanged
        and ``∂L/∂λ_new ≠ 0``, so the rank starts learning at once."""
        idx = torch.as_tensor(host["active"].numpy().nonzero()[0], dtype=torch.long, device="cpu")
        # Draw order (q then p, slot by slot) is part of the determinism contract: resume and DDP
        # replicas rebuild the same vectors from the same generator.
        draws_q, draws_p = [], []
        for _ in slots:
            draws_q.append(torch.randn(self.in_features, generator=generator, dtype=torch.float32, device="cpu"))
            draws_p.append(torch.randn(self.out_features, generator=generator, dtype=torch.float32, device="cpu"))
        # Sharded (FSDP2) parameters: host_slot_state gathered the whole active basis; every process draws
        # the same vectors from the same generator and writes its own shard.
        q = _orthonormal_complement_rows(host["lora_Q"].index_select(0, idx), torch.stack(draws_q))
        p = _orthonormal_complement_rows(host["lora_P"].index_select(1, idx).t(), torch.stack(draws_p))
        return {"lora_Q": q, "lora_P": p}

    def orthogonality_penalty(self) -> torch.Tensor:
        """``‖Q_a Q_aᵀ − I‖_F + ‖P_aᵀ P_a − I‖_F`` over the active slots ``a`` only (SPEC §1).

        On FSDP2-sharded parameters (outside the forward pass they are DTensors) the penalty is computed
        on the gathered full matrices; the all-gather is differentiable, so each shard gets its gradient."""
        m = self.active.to(self.lora_Q.dtype)
        q = full_tensor(self.lora_Q) * m[:, None].to(self.lora_Q.device)
        p = full_tensor(self.lora_P) * m[None, :].to(self.lora_P.device)
        eye = torch.diag(m)
        return torch.linalg.matrix_norm(q @ q.t() - eye) + torch.linalg.matrix_norm(p.t() @ p - eye)


class GatedLoRAAdapter(ElasticAdapter):
    """``ΔW = B · diag(m) · A · s``: plain LoRA with a 0/1 gate per rank (the LoRA form).

    Initialisation as PEFT's LoRA (Hu et al. 2021): ``A`` Kaiming-uniform (``U(−1/√d_in, 1/√d_in)``, PEFT's
    ``kaiming_uniform_(a=√5)``), ``B = 0``, so ΔW = 0. Default ``lora_alpha = 2 r_init``: the scale
    ``s = 2``, that of ``elalora train --method lora`` (PEFT's LoRA at ``lora_alpha = 2r``). With its
    ranks frozen this adapter *is* PEFT's LoRA (``tests/test_forms.py`` pins the losses).
    """

    form = "lora"
    # A grown rank starts at B = 0, so |w·∂L/∂w| scores it about 0 and the next round prunes it again. One
    # round of grace passed the planted-rank grace rule, written before its cells ran (the numbers:
    # docs/results/planted_rank.md, "The grace rule").
    default_grace_rounds = 1

    @classmethod
    def slot_shapes(cls, rank, in_features, out_features):
        return {"lora_B": (out_features, rank), "lora_A": (rank, in_features)}

    @classmethod
    def default_alpha(cls, initial_rank):
        return float(2 * max(int(initial_rank), 1))

    def __init__(self, base_layer: nn.Module, *, r: int, capacity: int, lora_alpha: float,
                 lora_dropout: float = 0.0, dtype: torch.dtype | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(base_layer, r=r, capacity=capacity, lora_alpha=lora_alpha,
                         lora_dropout=lora_dropout, dtype=dtype)
        c, f = self.capacity, self._factory
        self.lora_A = nn.Parameter(torch.zeros(c, self.in_features, **f))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, c, **f))
        with torch.no_grad():
            self.lora_A[:r] = _kaiming_rows(r, self.in_features, generator).to(**f)

    def slot_parameters(self):
        return [("lora_B", self.lora_B, 1), ("lora_A", self.lora_A, 0)]

    def _factors(self):
        a = full_tensor(self.lora_A)
        return a, self.active.to(a.dtype).to(a.device), full_tensor(self.lora_B)

    _basis_params = ("lora_A",)

    def new_slot_values(self, slots, generator, host):
        """New ranks: a fresh Kaiming row of ``A``, orthogonalised in fp32 against the active rows of A
        (and the other new rows; as the SVD form does for P and Q) and rescaled to its draw's norm, so it
        has LoRA's scale; a zero column of ``B``: ΔW is unchanged. (With ``B_{:,i} = 0`` the gradient into
        ``A_i`` is 0 too, so ``|w·∂L/∂w|`` scores a newborn rank about 0: see ElaLoRA's ``grace_rounds``.)"""
        # Draw order (one row per slot, in order) is part of the determinism contract.
        draws = torch.stack([_kaiming_rows(1, self.in_features, generator)[0] for _ in slots])
        idx = torch.as_tensor(host["active"].numpy().nonzero()[0], dtype=torch.long, device="cpu")
        basis = host["lora_A"].index_select(0, idx)
        return {"lora_A": _orthonormal_complement_rows(basis, draws) * draws.norm(dim=1, keepdim=True)}


def _kaiming_rows(n: int, d_in: int, generator: torch.Generator | None) -> torch.Tensor:
    # nn.init.kaiming_uniform_(a=sqrt(5)) on a (n × d_in) weight: U(-1/sqrt(d_in), 1/sqrt(d_in)).
    bound = 1.0 / math.sqrt(d_in)
    return (torch.rand(n, d_in, generator=generator, device="cpu") * 2 - 1) * bound


def _orthonormal_complement_rows(basis: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Orthonormalise the rows of ``draws`` (n × dim, fp32 Gaussian) against the rows of ``basis``
    and against each other, in order: row i is the unit direction of draw i orthogonal to the basis
    and to rows 0..i-1 (Gram–Schmidt of ``[basis; draws]``).

    The projection on the basis is exact, ``W ← W − Bᵀ (B Bᵀ)⁻¹ B W`` in float64 (Cholesky of the
    small Gram matrix), so the fp32 result is orthogonal to working precision even when the rows of
    ``B`` are far from orthonormal — unlike the single projection ``q − Qᵀ(Qq)`` of the authors'
    code, which is exact only for orthonormal Q. If ``B`` is ill-conditioned (cond² > 1e6) a
    rank-revealing QR basis is used instead, with the projection applied twice ("twice is enough",
    Giraud et al. 2005). All new ranks of one matrix share one Gram matrix and one projection
    (benchmarks/alloc_scaling.py: the round cost on a 7B layout is dominated by this function).
    """
    n, dim = draws.shape
    a = basis.shape[0]
    if a + n > dim:
        raise ValueError(f"cannot add {n} rank(s): {a} active ranks of a {dim}-dimensional space "
                         f"leave room for {dim - a}")
    w = draws.to(torch.float64)
    if a > 0:
        b = (basis if basis.device.type == "cpu" else to_host([basis])[0]).detach().to(torch.float64)
        gram = b @ b.t()
        chol, info = torch.linalg.cholesky_ex(gram)
        # cond(B)² ≲ 1e6: one float64 pass leaves |B w| ~ 1e-16·cond(B)², far below float32 precision.
        # (Host scalars are read through numpy: no tensor op that would stand for a device sync.)
        well_posed = (int(info.numpy()) == 0
                      and float(chol.diagonal().min().numpy()) ** 2 > 1e-6 * float(gram.diagonal().max().numpy()))
        if well_posed:
            w = w - torch.cholesky_solve(b @ w.t(), chol).t() @ b
        else:
            u, r = torch.linalg.qr(b.t())  # (dim, a): orthonormal basis of the row space
            keep = r.diagonal().abs() > 1e-6 * max(1.0, float(r.diagonal().abs().max().numpy()))
            u = u[:, torch.as_tensor(keep.numpy().nonzero()[0], dtype=torch.long, device="cpu")]
            for _ in range(2):
                w = w - (w @ u) @ u.t()
    out = torch.empty(n, dim, dtype=torch.float64, device="cpu")
    for i in range(n):
        v = w[i]
        if i:
            prev = out[:i]
            for _ in range(2):  # classical Gram–Schmidt, twice (the earlier rows are orthonormal)
                v = v - (prev @ v) @ prev
        nv = v.norm()
        nvf = float(nv.numpy())
        if not math.isfinite(nvf) or nvf < 1e-6:
            raise ValueError("could not draw a new rank orthogonal to the active ones")
        out[i] = v / nv
    return out.to(torch.float32)


#: ``(d_in, d_out, fan_in_fan_out)`` of a supported base layer; ``TypeError`` for any other layer.
base_shape = _base_shape

#: The adapter forms: one class per form. A new form is one ElasticAdapter subclass and one entry here.
ADAPTER_FORMS: dict[str, type[ElasticAdapter]] = {"svd": SVDAdapter, "lora": GatedLoRAAdapter}


def adapter_form(form: str) -> type[ElasticAdapter]:
    """The adapter class of ``form``; ``ValueError`` naming the known forms otherwise."""
    try:
        return ADAPTER_FORMS[form]
    except (KeyError, TypeError):
        raise ValueError(f"unknown adapter form {form!r}; known: {', '.join(sorted(ADAPTER_FORMS))}") from None


def adapter_param_count(form: str, rank: int, in_features: int, out_features: int) -> int:
    """Parameters of ``rank`` active ranks of ``form``: ``r (d_in + d_out)`` for ``lora``, plus ``r``
    singular values for ``svd`` (the sizes of :meth:`ElasticAdapter.slot_shapes`)."""
    return sum(math.prod(s)
               for s in adapter_form(form).slot_shapes(int(rank), int(in_features), int(out_features)).values())
