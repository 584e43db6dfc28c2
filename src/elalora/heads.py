"""Sentence-level pooling for sequence-classification heads.

Hugging Face's ``BertForSequenceClassification`` (and the other BERT-like ``...ForSequenceClassification``
classes with a ``pooler``) puts its classifier on the *pooler*: ``tanh(W h_[CLS] + b)``. That pooler was
trained by BERT's next-sentence objective. Sentence-embedding checkpoints such as all-MiniLM-L6-v2 were
instead fine-tuned for the **masked mean of the last hidden states** (Reimers & Gurevych 2019,
Sentence-BERT, §3) and their pooler is left untrained by that stage. :func:`use_mean_pooling` swaps the
pooler for that mean, so the classifier reads the representation the checkpoint was trained to produce:

    pooled = Σ_t m_t h_t / max(Σ_t m_t, 1)        (m: attention mask, h_t: last hidden state of token t)

The swap is structural only (no parameters: the pooler's dense layer is removed, not reused), so an
adapter trained with it must be evaluated with it too. :func:`head_info` describes the head an adapter
was trained with (pooling, task type, labels, base model) as a small JSON-able dict; every export
carries it (``elalora_head.json``, written by :mod:`elalora.persistence`), and :func:`restore_head`
puts the pooling back on a fresh base model (:func:`elalora.load_adapter` and ``elalora eval`` call it).
A plain-PEFT user restores it with the one call ``elalora.heads.use_mean_pooling(base)``.

Imports: torch, :mod:`elalora.errors`.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["MeanPooler", "use_mean_pooling", "pooling_of", "head_info", "restore_head", "head_mismatch",
           "replaced_module_names", "RESTORE_CALL"]

#: The one call that gives a plain transformers base model the head of a mean-pooling adapter.
RESTORE_CALL = "elalora.heads.use_mean_pooling(base)"


class MeanPooler(nn.Module):
    """Masked mean of the hidden states over the tokens; drop-in for a BERT-style ``pooler``.

    The attention mask is not an argument of ``pooler.forward(hidden_states)``; it is captured by a
    forward pre-hook on the encoder (installed by :func:`use_mean_pooling`) and kept in ``self.mask``
    for the one forward pass that follows. Without a mask every token counts.
    """

    pooling = "mean"

    def __init__(self, replaced: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None
        # submodule names of the pooler this one replaced (("dense", "activation") for BERT): a base model
        # loaded afresh has them again, and a PEFT target name must not match them
        self.replaced = tuple(replaced)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self.mask
        self.mask = None  # one mask per forward: a stale one must never be reused
        if mask is None or mask.shape != hidden_states.shape[:2]:
            return hidden_states.mean(dim=1)
        m = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def _encoder_with_pooler(model: nn.Module) -> nn.Module:
    """The (sub)module that owns the ``pooler`` (``model.bert`` for ``BertForSequenceClassification``)."""
    for module in model.modules():  # the model itself first
        if isinstance(getattr(module, "pooler", None), nn.Module):
            return module
    raise ConfigError(f"{type(model).__name__} has no 'pooler' submodule to replace with mean pooling; "
                     "mean pooling applies to BERT-like sequence classifiers whose head reads a pooler")


def use_mean_pooling(model: nn.Module) -> nn.Module:
    """Replace the pooler of a BERT-like model by :class:`MeanPooler` (in place; returns ``model``).

    Call it on the base model *before* wrapping it with adapters (PEFT or elalora), and keep
    ``"pooler"`` out of ``modules_to_save`` (the mean pooler has no parameters). Idempotent.

    Raises:
        ConfigError: (a ``ValueError``) the model has no ``pooler`` (e.g. a LLaMA ``score`` head).
    """
    encoder = _encoder_with_pooler(model)
    if isinstance(encoder.pooler, MeanPooler):
        return model
    pooler = MeanPooler(tuple(n for n, _ in encoder.pooler.named_modules() if n))
    encoder.pooler = pooler

    def capture_mask(_module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]  # positional (input_ids, attention_mask, ...)
        pooler.mask = mask
        return None

    encoder.register_forward_pre_hook(capture_mask, with_kwargs=True)
    return model


def pooling_of(model: nn.Module) -> str:
    """``"mean"`` when :func:`use_mean_pooling` was applied, else ``"cls"`` (the model's own pooler or head)."""
    return "mean" if any(isinstance(m, MeanPooler) for m in model.modules()) else "cls"


def replaced_module_names(model: nn.Module) -> list[str]:
    """Full names of the modules :func:`use_mean_pooling` removed (``bert.pooler.dense`` ...): present
    again in a base model loaded afresh, so exported target names must not match them."""
    return [f"{name}.{sub}" if name else sub for name, m in model.named_modules() if isinstance(m, MeanPooler)
            for sub in m.replaced]


def head_info(model: nn.Module) -> dict:
    """What reproducing ``model``'s outputs needs besides the adapter weights (JSON-able):

    ``pooling`` (:func:`pooling_of`), ``task_type`` (``classification`` / ``regression`` /
    ``generation`` / ``image`` / ``other``, from the model class and ``config.problem_type``),
    ``num_labels``, ``id2label``, ``problem_type``, ``model_class`` and ``base_model`` (the config's
    ``name_or_path``), and ``restore``: the call that restores the pooling on a plain base model
    (``None`` when loading the base as usual is enough)."""
    cfg = getattr(model, "config", None)
    cls = type(model).__name__
    problem = getattr(cfg, "problem_type", None)
    n = getattr(cfg, "num_labels", None)
    if cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel"):
        kind = "generation"
    elif cls.endswith("ForImageClassification"):
        kind = "image"
    elif cls.endswith("ForSequenceClassification"):
        kind = "regression" if problem == "regression" or (problem is None and n == 1) else "classification"
    else:
        kind = "other"
    pooling = pooling_of(model)
    id2label = getattr(cfg, "id2label", None) if kind in ("classification", "image") else None
    return {"pooling": pooling, "task_type": kind, "num_labels": n if kind != "generation" else None,
            "problem_type": problem, "id2label": {str(k): v for k, v in (id2label or {}).items()} or None,
            "model_class": cls,
            "base_model": getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None),
            "restore": RESTORE_CALL if pooling == "mean" else None}


def head_mismatch(model: nn.Module, info: dict | None) -> str | None:
    """A one-line warning when ``model``'s head differs from the recorded ``info`` (else ``None``)."""
    if not info:
        return None
    want, have = info.get("pooling"), pooling_of(model)
    if want and want != have:
        fix = f"call {RESTORE_CALL} before loading the adapter" if want == "mean" else \
            "load a fresh base model (without use_mean_pooling)"
        return (f"this adapter was trained with {want} pooling but the model uses {have} pooling: its outputs "
                f"will be wrong; {fix}")
    n = info.get("num_labels")
    cfg = getattr(model, "config", None)
    if n and getattr(cfg, "num_labels", n) != n:
        return (f"this adapter was trained with num_labels={n} but the model has num_labels={cfg.num_labels}; "
                f"load the base with num_labels={n}")
    return None


def restore_head(model: nn.Module, info: dict | None) -> nn.Module:
    """Put the recorded pooling back on a fresh base ``model`` (in place; before any adapter wraps it).

    Raises:
        ConfigError: the model already carries the other pooling, or cannot take mean pooling.
    """
    if not info or info.get("pooling") in (None, pooling_of(model)):
        return model
    if info["pooling"] == "mean":
        return use_mean_pooling(model)
    raise ConfigError(f"the adapter was trained with {info['pooling']!r} pooling but the model has mean pooling; "
                      "load a fresh base model")
