"""Sentence-level pooling for sequence-classification heads.

Hugging Face's ``BertForSequenceClassification`` (and the other BERT-like ``...ForSequenceClassification``
classes with a ``pooler``) puts its classifier on the *pooler*: ``tanh(W h_[CLS] + b)``. That pooler was
trained by BERT's next-sentence objective. Sentence-embedding checkpoints such as all-MiniLM-L6-v2 were
instead fine-tuned for the **masked mean of the last hidden states** (Reimers & Gurevych 2019,
Sentence-BERT, §3) and their pooler is left untrained by that stage. :func:`use_mean_pooling` swaps the
pooler for that mean, so the classifier reads the representation the checkpoint was trained to produce:

    pooled = Σ_t m_t h_t / max(Σ_t m_t, 1)        (m: attention mask, h_t: last hidden state of token t)

The swap is structural only (no parameters: the pooler's dense layer is removed, not reused), so an
adapter trained with it must be evaluated with it too; the recipe records the choice in config.json.

Imports: torch, :mod:`elalora.errors`.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["MeanPooler", "use_mean_pooling", "pooling_of"]


class MeanPooler(nn.Module):
    """Masked mean of the hidden states over the tokens; drop-in for a BERT-style ``pooler``.

    The attention mask is not an argument of ``pooler.forward(hidden_states)``; it is captured by a
    forward pre-hook on the encoder (installed by :func:`use_mean_pooling`) and kept in ``self.mask``
    for the one forward pass that follows. Without a mask every token counts.
    """

    pooling = "mean"

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

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
    pooler = MeanPooler()
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
