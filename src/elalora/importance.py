"""Sensitivity × uncertainty importance scores (AdaLoRA eqs. 8–11; ElaLoRA §3.2; SPEC §2).

Once per optimizer step, after ``optimizer.step()`` and before the gradients are cleared, for every
element ``w`` of P, λ, Q (post-step value, with the gradient that produced the step)::

    I(t) = |w · ∂L/∂w|
    Ī(t) = β1 Ī(t−1) + (1 − β1) I(t)                 (sensitivity EMA)
    Ū(t) = β2 Ū(t−1) + (1 − β2) |I(t) − Ī(t)|        (uncertainty EMA, with the new Ī)
    s(w) = Ī(t) · Ū(t)

and the score of rank ``i`` of one matrix is ``S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)``.

Only Ī and Ū are state (two copies of the adapter parameters; PEFT also keeps ``I``). The update runs
as a handful of ``torch._foreach_*`` kernels over all adapters at once, and the per-rank scores are
refreshed in the same pass, so an allocation round only has to sort a few thousand numbers.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .layers import ElasticAdapter

__all__ = ["ImportanceTracker"]


class ImportanceTracker:
    """EMA importance state for a list of SVD adapters.

    Args:
        adapters: the adapters, in a fixed order (the order is the module index everywhere).
        beta1, beta2: EMA coefficients for sensitivity and uncertainty.
    """

    def __init__(self, adapters: Sequence[ElasticAdapter], beta1: float = 0.85, beta2: float = 0.85) -> None:
        self.adapters = list(adapters)
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        # Flat parameter list: [P_0, λ_0, Q_0, P_1, λ_1, Q_1, ...] and the slot axis of each.
        self._params: list[torch.Tensor] = []
        self._slot_dims: list[int] = []
        for a in self.adapters:
            for _, p, dim in a.slot_parameters():
                self._params.append(p)
                self._slot_dims.append(dim)
        self.sens: list[torch.Tensor] | None = None  # Ī
        self.unc: list[torch.Tensor] | None = None   # Ū
        self._scores: list[torch.Tensor] | None = None
        self.num_updates = 0
        self.num_skipped = 0

    # --------------------------------------------------------------------------------- state
    def _ensure_state(self) -> None:
        if self.sens is None or self.sens[0].device != self._params[0].device:
            if self.sens is None:
                self.sens = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in self._params]
                self.unc = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in self._params]
            else:  # the model moved (e.g. .to("cuda") after wrapping): follow it
                self.sens = [s.to(p.device) for s, p in zip(self.sens, self._params)]
                self.unc = [u.to(p.device) for u, p in zip(self.unc, self._params)]

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
        else:
            if len(state["sens"]) != len(self._params):
                raise ValueError(
                    f"importance state holds {len(state['sens'])} tensors but the model has {len(self._params)} adapter "
                    "parameters: the checkpoint comes from a different adapter layout")
            for s, p in zip(state["sens"], self._params):
                if s.shape != p.shape:
                    raise ValueError(f"importance state shape {tuple(s.shape)} does not match parameter {tuple(p.shape)}")
            self.sens = [s.to(p.device, p.dtype) for s, p in zip(state["sens"], self._params)]
            self.unc = [u.to(p.device, p.dtype) for u, p in zip(state["unc"], self._params)]
        self.num_updates = int(state.get("num_updates", 0))
        self.num_skipped = int(state.get("num_skipped", 0))
        self._scores = None

    # -------------------------------------------------------------------------------- update
    @torch.no_grad()
    def update(self) -> bool:
        """One EMA step from the current parameters and gradients.

        Returns ``False`` (and changes nothing) when any adapter gradient is non-finite, i.e. on an
        fp16 step that the grad scaler skipped. Parameters whose gradient is ``None`` contribute
        ``I = 0`` (an adapter that took no part in this step's loss).
        """
        self._ensure_state()
        grads = [p.grad for p in self._params]
        have = [i for i, g in enumerate(grads) if g is not None]
        if have:
            g_have = [grads[i] for i in have]
            # One reduction per tensor, then a single host sync for the whole model.
            norms = torch._foreach_norm(g_have)
            if not bool(torch.isfinite(torch.stack([n.float() for n in norms]).sum())):
                self.num_skipped += 1
                return False
        b1, b2 = self.beta1, self.beta2
        # I = |w · g|; tensors with no grad get I = 0 (their EMAs decay).
        ipt = [torch.zeros_like(s) for s in self.sens]
        if have:
            prods = torch._foreach_mul([self._params[i].detach() for i in have], [grads[i] for i in have])
            torch._foreach_abs_(prods)
            for j, i in enumerate(have):
                ipt[i] = prods[j]
        torch._foreach_lerp_(self.sens, ipt, 1.0 - b1)          # Ī ← β1 Ī + (1−β1) I
        torch._foreach_sub_(ipt, self.sens)                      # I − Ī  (new Ī)
        torch._foreach_abs_(ipt)
        torch._foreach_lerp_(self.unc, ipt, 1.0 - b2)            # Ū ← β2 Ū + (1−β2)|I − Ī|
        self.num_updates += 1
        self._scores = None
        return True

    # -------------------------------------------------------------------------------- scores
    @torch.no_grad()
    def rank_scores(self) -> list[torch.Tensor]:
        """Per-rank score ``S_i`` of every adapter (length = capacity; fp32, on the CPU)."""
        if self._scores is not None:
            return self._scores
        if self.sens is None:
            self._scores = [torch.zeros(a.capacity) for a in self.adapters]
            return self._scores
        elem = torch._foreach_mul(self.sens, self.unc)           # s(w) = Ī · Ū
        out = []
        for a in range(len(self.adapters)):
            p_s, l_s, q_s = elem[3 * a], elem[3 * a + 1], elem[3 * a + 2]
            out.append((l_s.float() + q_s.float().mean(dim=1) + p_s.float().mean(dim=0)))
        # One transfer for all adapters.
        flat = torch.cat(out).cpu()
        self._scores = list(flat.split([a.capacity for a in self.adapters]))
        return self._scores

    @torch.no_grad()
    def reset_slots(self, adapter_index: int, slots: Sequence[int]) -> None:
        """Zero the EMA state of ``slots`` of one adapter (pruned or newly activated ranks)."""
        if self.sens is None or not slots:
            return
        base = 3 * adapter_index
        for j in range(3):
            dim = self._slot_dims[base + j]
            idx = torch.as_tensor(list(slots), dtype=torch.long, device=self.sens[base + j].device)
            self.sens[base + j].index_fill_(dim, idx, 0.0)
            self.unc[base + j].index_fill_(dim, idx, 0.0)
        self._scores = None

    def state_bytes(self) -> int:
        """Bytes of allocator state (Ī and Ū)."""
        if self.sens is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self.sens + self.unc)
