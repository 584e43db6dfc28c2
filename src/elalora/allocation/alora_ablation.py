"""ALoRA's batched ablations (AB-LoRA, Liu et al. 2024, arXiv:2403.16187, §3.2; SPEC §5): the loss of
every mask ``M``, ``M \\ ρ`` and ``M_ρ`` of one round, and the scores ``IS(ρ)`` built from them.

:func:`ablation_scores` evaluates ``chunk`` masks per forward pass over ``chunk`` copies of the
held-out batch (per-example ``example_gate`` on every adapter), optionally skipping what runs before
each mask's adapter (prefix reuse, :mod:`.alora_reuse`). The cost and the default losses are in the
docstring of :mod:`elalora.allocation.alora`, which holds the rounds built on these scores.

Imports: torch, :mod:`elalora.layers`, :mod:`.alora_reuse`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import ElasticAdapter
from .alora_reuse import PrefixCache, StubMisuse, TraceMismatch, warn_fallback

__all__ = ["ablation_scores", "LossFn", "ProgressFn"]

LossFn = Callable[[object, dict], torch.Tensor]

_NO_SHIFT_LOSS_TYPES = {"ForTokenClassification", "ForMaskedLM", "ForConditionalGeneration"}


# ------------------------------------------------------------------------------------ batches
def _batch_size(batch: dict) -> int:
    for key in ("labels", "input_ids", "inputs_embeds", "pixel_values"):
        v = batch.get(key)
        if torch.is_tensor(v) and v.dim() >= 1:
            return int(v.shape[0])
    for v in batch.values():
        if torch.is_tensor(v) and v.dim() >= 1:
            return int(v.shape[0])
    raise ValueError("the validation batch holds no tensor with a batch dimension")


def _tile(batch: dict, n: int, size: int, device: torch.device | None) -> dict:
    """``n`` copies of ``batch`` along dimension 0 (copy-major: rows ``j·size … (j+1)·size − 1``)."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            if device is not None:
                v = v.to(device)
            if v.dim() >= 1 and v.shape[0] == size and n > 1:
                v = v.repeat(n, *([1] * (v.dim() - 1)))
        out[k] = v
    return out


def _input_device(model: nn.Module) -> torch.device | None:
    try:
        emb = model.get_input_embeddings()
        if emb is not None and getattr(emb, "weight", None) is not None:
            return emb.weight.device
    except (AttributeError, NotImplementedError):
        pass
    p = next(model.parameters(), None)
    return None if p is None else p.device


def _logits(outputs) -> torch.Tensor:
    if torch.is_tensor(outputs):
        return outputs
    if getattr(outputs, "logits", None) is not None:
        return outputs.logits
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)) and outputs and torch.is_tensor(outputs[0]):
        return outputs[0]
    raise TypeError("cannot find logits in the model outputs; pass loss_fn to set_validation_batch")


def _per_mask_default_loss(model: nn.Module, outputs, labels: torch.Tensor, n_masks: int) -> torch.Tensor:
    """Loss of each of the ``n_masks`` copies of the batch, shape ``(n_masks,)`` (float32)."""
    logits = _logits(outputs).float()
    labels = labels.to(logits.device)
    cfg = getattr(model, "config", None)
    if logits.dim() == 2:  # sequence classification / regression (HF's problem_type rules)
        n_cls = logits.shape[-1]
        pt = getattr(cfg, "problem_type", None)
        if pt is None:
            if n_cls == 1:
                pt = "regression"
            elif labels.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
                pt = "single_label_classification"
            else:
                pt = "multi_label_classification"
        if pt == "regression":
            pred = logits.squeeze(-1) if n_cls == 1 else logits
            err = (pred - labels.float().view_as(pred)) ** 2
            per = err.reshape(err.shape[0], -1).mean(1)
            valid = torch.ones_like(per)
        elif pt == "single_label_classification":
            lab = labels.view(-1).long()
            per = F.cross_entropy(logits, lab, reduction="none", ignore_index=-100)
            valid = (lab != -100).float()
        else:
            per = F.binary_cross_entropy_with_logits(logits, labels.float().view_as(logits), reduction="none").mean(-1)
            valid = torch.ones_like(per)
    elif logits.dim() == 3:  # token-level: causal LM (shifted), token classification / MLM / seq2seq (not)
        loss_type = getattr(model, "loss_type", None)
        shift = not (loss_type in _NO_SHIFT_LOSS_TYPES or getattr(cfg, "is_encoder_decoder", False))
        lab = labels.long()
        if shift:
            logits, lab = logits[:, :-1], lab[:, 1:]
        per = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1), reduction="none",
                              ignore_index=-100).view(lab.shape)
        valid = (lab != -100).float()
    else:
        raise ValueError(f"no default loss for logits of shape {tuple(logits.shape)}; "
                         "pass loss_fn to set_validation_batch")
    per = (per * valid).reshape(n_masks, -1).sum(1)
    count = valid.reshape(n_masks, -1).sum(1)
    if bool((count == 0).any()):
        raise ValueError("the validation batch has no valid label (all -100)")
    return per / count


# --------------------------------------------------------------------------------- importance
def _gates_for_chunk(kind: torch.Tensor, mod: torch.Tensor, slot: torch.Tensor, m: int, capacity: int) -> torch.Tensor:
    """``(n, capacity)`` gates of adapter ``m`` for masks ``(kind, module, slot)``:
    kind 0 = full model, 1 = only ``(module, slot)`` removed, 2 = only ``(module, slot)`` kept."""
    n = kind.numel()
    g = torch.ones(n, capacity, device="cpu")
    only = kind == 2
    g[only] = 0.0
    rows = torch.nonzero(only & (mod == m), as_tuple=False).flatten()
    g[rows, slot[rows]] = 1.0
    rows = torch.nonzero((kind == 1) & (mod == m), as_tuple=False).flatten()
    g[rows, slot[rows]] = 0.0
    return g


def _mask_losses(model, outputs, inputs: dict, labels, n: int, size: int, loss_fn: LossFn | None) -> torch.Tensor:
    """Loss of each of the ``n`` masks of one forward pass over ``n`` stacked copies of the batch."""
    if loss_fn is None:
        return _per_mask_default_loss(model, outputs, labels, n)
    full = dict(inputs)
    if labels is not None:
        full["labels"] = labels
    per = torch.as_tensor(loss_fn(outputs, full)).float().reshape(-1)
    if per.numel() != n * size:
        raise ValueError(f"loss_fn must return one loss per example ({n * size}); got {per.numel()} values")
    return per.view(n, size).mean(1)


def _without_kv_cache(model: nn.Module, inputs: dict) -> dict:
    """``use_cache=False`` where the model's forward takes it: ablations never decode, and a KV cache
    is memory for nothing (and state that prefix reuse would have to keep consistent)."""
    if "use_cache" in inputs:
        return inputs
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return inputs
    if "use_cache" in params:
        return {**inputs, "use_cache": False}
    return inputs


ProgressFn = Callable[[int, int], None]


def _mask_table(adapters: Sequence[ElasticAdapter]):
    """Every mask of a round, mask 0 the full model, then ``P`` "removed", then ``P`` "kept only":
    ``(pairs, kind, module, slot)`` with ``pairs[j] = (module, slot)`` of the ``j``-th active rank."""
    pairs = [(m, int(s)) for m, a in enumerate(adapters) for s in a.active_indices().tolist()]
    p_count = len(pairs)
    host = {"dtype": torch.long, "device": "cpu"}  # the mask table lives on the host
    mods = torch.tensor([m for m, _ in pairs], **host)
    slots = torch.tensor([s for _, s in pairs], **host)
    kind = torch.cat([torch.zeros(1, **host), torch.ones(p_count, **host), torch.full((p_count,), 2, **host)])
    mod = torch.cat([torch.full((1,), -1, **host), mods, mods])
    slot = torch.cat([torch.zeros(1, **host), slots, slots])
    return pairs, kind, mod, slot


class _Round:
    """The state one round of ablations shares between its steps: the batch, the mask table, the
    losses found so far and the progress count."""

    def __init__(self, model, adapters, inputs, labels, size, loss_fn, progress):
        self.model, self.adapters, self.inputs, self.labels, self.size = model, adapters, inputs, labels, size
        self.loss_fn, self.progress = loss_fn, progress
        self.pairs, self.kind, self.mod, self.slot = _mask_table(adapters)
        self.n_total = self.kind.numel()
        self.device = _input_device(model)
        self.loss = torch.full((self.n_total,), float("nan"), dtype=torch.float64, device="cpu")
        self.done = 0

    def tell(self, k: int) -> None:
        self.done += k
        if self.progress is not None:
            self.progress(self.done, self.n_total)

    def set_all_gates(self, value: float) -> None:
        for a in self.adapters:
            a.example_gate = torch.full((self.size, a.capacity), value, device=a.lora_A.device, dtype=a.lora_A.dtype)

    def prefix_cache(self) -> tuple[PrefixCache | None, list[int]]:
        """The prefix cache (``None`` where reuse does not apply) and the order to evaluate the masks
        in; with a cache the full model's loss (mask 0) comes from its caching pass."""
        one = _tile(self.inputs, 1, self.size, self.device)
        try:
            cache = PrefixCache.build(self.model, self.adapters, one, self.size, self.set_all_gates)
        except TraceMismatch as e:
            warn_fallback(str(e))
            cache = None
        if cache is None or not cache.useful:
            return None, list(range(self.n_total))
        labels = self.labels
        if labels is not None and self.device is not None:
            labels = labels.to(self.device)
        self.loss[0] = _mask_losses(self.model, cache.full_outputs, one, labels, 1, self.size,
                                    self.loss_fn)[0].double().cpu()
        cache.full_outputs = None
        self.tell(1)
        # masks of the same adapter (then of neighbouring ones) share a chunk: the chunk skips what its
        # earliest adapter skips
        kind, mod, slot = self.kind, self.mod, self.slot
        order = sorted(range(1, self.n_total),
                       key=lambda j: (cache.adapter_order[int(mod[j])], int(mod[j]), int(kind[j]), int(slot[j])))
        return cache, order

    def run(self, order: list[int], chunk: int, cache: PrefixCache | None) -> None:
        """The losses of the masks ``order``, ``chunk`` per forward pass (stubbed by ``cache``; if a stub
        is misused, that chunk and the rest run the full forward pass)."""
        pos = 0
        while pos < len(order):
            idx = torch.tensor(order[pos:pos + chunk], dtype=torch.long, device="cpu")
            n = idx.numel()
            ck, cm, cs = self.kind[idx], self.mod[idx], self.slot[idx]
            for m, a in enumerate(self.adapters):
                g = _gates_for_chunk(ck, cm, cs, m, a.capacity).repeat_interleave(self.size, dim=0)
                a.example_gate = g.to(device=a.lora_A.device, dtype=a.lora_A.dtype)
            tiled_inputs = _tile(self.inputs, n, self.size, self.device)
            tiled_labels = None if self.labels is None else _tile({"l": self.labels}, n, self.size, self.device)["l"]
            if cache is not None:
                try:
                    with cache.stubbed(cm.tolist(), (ck == 2).tolist()):
                        outputs = self.model(**tiled_inputs)
                except StubMisuse as e:
                    warn_fallback(str(e))
                    cache = None
                    continue  # the same chunk again, without stubs
            else:
                outputs = self.model(**tiled_inputs)
            losses = _mask_losses(self.model, outputs, tiled_inputs, tiled_labels, n, self.size, self.loss_fn)
            self.loss[idx] = losses.detach().double().cpu()
            del outputs
            pos += n
            self.tell(n)

    def results(self, return_losses: bool):
        """``IS = −L(M) + L(M \\ ρ) − L(M_ρ)`` per adapter slot (NaN where inactive), and the losses."""
        if not bool(torch.isfinite(self.loss).all()):
            raise FloatingPointError("the validation loss of some ablation is not finite; ALoRA cannot rank the ranks")
        p_count = len(self.pairs)
        full, removed, kept = self.loss[0], self.loss[1:1 + p_count], self.loss[1 + p_count:]
        scores, rem, kep = ([torch.full((a.capacity,), float("nan"), dtype=torch.float64, device="cpu")
                             for a in self.adapters]
                            for _ in range(3))
        is_ = -full + removed - kept
        for j, (m, s) in enumerate(self.pairs):
            scores[m][s], rem[m][s], kep[m][s] = is_[j], removed[j], kept[j]
        return (scores, (float(full), rem, kep)) if return_losses else scores


@torch.no_grad()
def ablation_scores(
    model: nn.Module,
    adapters: Sequence[ElasticAdapter],
    batch: Mapping,
    *,
    chunk: int = 8,
    loss_fn: LossFn | None = None,
    return_losses: bool = False,
    prefix_reuse: bool = True,
    progress: ProgressFn | None = None,
):
    """AB-LoRA scores of every active rank: a list (one per adapter) of float64 tensors of length
    ``capacity``, ``IS(ρ) = −L(M) + L(M \\ ρ) − L(M_ρ)`` at active slots and NaN at inactive ones.

    ``chunk`` masks are evaluated per forward pass over ``chunk`` copies of ``batch`` (module
    docstring of :mod:`elalora.allocation.alora`: cost). With ``prefix_reuse`` (default) each mask
    skips the modules that finished before its adapter started, using outputs cached once from the
    full and the base model (:mod:`elalora.allocation.alora_reuse`; same scores to float rounding,
    automatic fallback to the full forward pass). ``progress(done, total)`` is called with the number
    of masks evaluated so far (first with 0, last with ``total = 1 + 2P``). With ``return_losses``
    also returns ``(L(M), L_removed, L_kept)``, the last two lists aligned with the scores.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1; got {chunk}")
    for a in adapters:
        if a.merged or a.disabled:
            raise RuntimeError("ALoRA ablations need unmerged, enabled adapters "
                               "(call unmerge() / set_adapters_enabled(True))")
    batch = dict(batch)
    size = _batch_size(batch)
    labels = batch.get("labels")
    if loss_fn is None and labels is None:
        raise ValueError("the validation batch has no 'labels'; add them or pass loss_fn(model_outputs, batch)")
    inputs = _without_kv_cache(model, {k: v for k, v in batch.items() if k != "labels"})
    rnd = _Round(model, adapters, inputs, labels, size, loss_fn, progress)
    flags = [(mod_, mod_.training) for mod_ in model.modules()]
    try:
        model.eval()
        rnd.tell(0)
        cache, order = None, list(range(rnd.n_total))
        if prefix_reuse and rnd.pairs:
            cache, order = rnd.prefix_cache()
        rnd.run(order, chunk, cache)
    finally:
        for a in adapters:
            a.example_gate = None
        for mod_, flag in flags:
            mod_.training = flag
    return rnd.results(return_losses)
