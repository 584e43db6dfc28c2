"""Batch collation: text (pair) classification / regression, causal-LM training and prompts, images.

Imports: torch (lazily), :mod:`.e2e` (the prompt format), :mod:`elalora._extras` (pillow, lazily).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


from .._extras import require
from ..errors import TaskError
from .e2e import build_prompt
from .spec import TaskSpec

__all__ = ["TextClassificationCollator", "CausalLMCollator", "ImageCollator", "encode_prompts", "eos_id"]

# ---------------------------------------------------------------------------------------------
# Collators
# ---------------------------------------------------------------------------------------------


class TextClassificationCollator:
    """Tokenise text (pair) examples into a dynamically padded batch.

    Each batch is padded to its longest sequence (after truncation to ``max_length``), not to
    ``max_length``. Returns ``input_ids``, ``attention_mask``, ``token_type_ids`` (when the tokenizer
    produces them) and ``labels`` (``torch.long`` for classification, ``torch.float`` for
    regression; omitted when the examples have no ``"label"``).

    Args:
        tokenizer: A Hugging Face tokenizer with a pad token.
        max_length: Maximum number of tokens per example (pairs are truncated longest-first).
        kind: ``"classification"`` or ``"regression"`` (a :class:`TaskSpec` is accepted too).
    """

    def __init__(self, tokenizer: Any, max_length: int, kind: str | TaskSpec = "classification") -> None:
        if isinstance(kind, TaskSpec):
            kind = kind.kind
        if kind not in ("classification", "regression"):
            raise ValueError(f"kind must be 'classification' or 'regression'; got {kind!r}")
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2; got {max_length!r}")
        if getattr(tokenizer, "pad_token", None) is None:
            raise ValueError("the tokenizer has no pad token; set one first "
                             "(e.g. tokenizer.pad_token = tokenizer.eos_token)")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.kind = kind

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        import torch

        if not examples:
            raise ValueError("cannot collate an empty batch")
        text_a = [ex["text_a"] for ex in examples]
        has_b = ["text_b" in ex and ex["text_b"] is not None for ex in examples]
        if any(has_b) and not all(has_b):
            raise ValueError("a batch mixes single-text and text-pair examples")
        text_b = [ex["text_b"] for ex in examples] if all(has_b) else None
        batch = self.tokenizer(text_a, text_b, truncation=True, max_length=self.max_length,
                               padding="longest", return_tensors="pt")
        out = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        if all("label" in ex and ex["label"] is not None for ex in examples):
            dtype = torch.float if self.kind == "regression" else torch.long
            out["labels"] = torch.tensor([ex["label"] for ex in examples], dtype=dtype, device="cpu")
        return out


def _special_prefix(tokenizer: Any) -> list[int]:
    """Special tokens the tokenizer puts in front of a text (e.g. Llama's BOS; BERT's [CLS])."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def eos_id(tokenizer: Any) -> int:
    for attr in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has neither an EOS nor a SEP token to end generation targets with")


def encode_prompts(tokenizer: Any, prompts: Sequence[str | Mapping[str, Any]], max_length: int) -> dict[str, Any]:
    """Left-padded batch of prompts for ``model.generate``.

    Strings are used verbatim; generation examples (dicts) go through :func:`build_prompt` first.
    Prompts are tokenised exactly as in :class:`CausalLMCollator` (the tokenizer's leading special
    tokens, no trailing ones) and, if longer than ``max_length``, keep their last ``max_length``
    tokens so that the prompt suffix (``"Description:"``) survives. Padding uses the pad token (the
    EOS token if there is none). Returns ``input_ids`` and ``attention_mask`` (``torch.long``).
    """
    import torch

    if not prompts:
        raise ValueError("cannot encode an empty list of prompts")
    prefix = _special_prefix(tokenizer)
    texts = [p if isinstance(p, str) else build_prompt(p) for p in prompts]
    seqs = [(prefix + tokenizer(t, add_special_tokens=False)["input_ids"])[-max_length:] for t in texts]
    width = max(len(s) for s in seqs)
    pad = _pad_id(tokenizer)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long, device="cpu")
    attention = torch.zeros((len(seqs), width), dtype=torch.long, device="cpu")
    for i, s in enumerate(seqs):
        if s:
            input_ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long, device="cpu")
            attention[i, width - len(s):] = 1
    return {"input_ids": input_ids, "attention_mask": attention}


class CausalLMCollator:
    """Training batches for a causal language model on generation examples.

    Each sequence is ``build_prompt(example) + " " + target + EOS`` (the tokenizer's leading special
    tokens such as BOS are kept; BERT-style tokenizers without EOS use SEP). ``labels`` equal
    ``input_ids`` on the target and EOS tokens and ``-100`` on prompt and padding tokens, so the
    loss covers only the continuation. Sequences longer than ``max_length`` are cut at the end;
    padding is on the right, to the longest sequence of the batch.
    """

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2; got {max_length!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.eos_id = eos_id(tokenizer)
        self.pad_id = _pad_id(tokenizer)
        self.prefix = _special_prefix(tokenizer)

    def encode_prompts(self, prompts: Sequence[str | Mapping[str, Any]],
                       max_length: int | None = None) -> dict[str, Any]:
        """Left-padded generation batch; see :func:`encode_prompts`."""
        return encode_prompts(self.tokenizer, prompts, max_length or self.max_length)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        import torch

        if not examples:
            raise ValueError("cannot collate an empty batch")
        seqs, n_prompt = [], []
        for ex in examples:
            prompt = self.prefix + self.tokenizer(build_prompt(ex), add_special_tokens=False)["input_ids"]
            target = self.tokenizer(" " + str(ex["target"]).strip(), add_special_tokens=False)["input_ids"]
            ids = (prompt + target + [self.eos_id])[: self.max_length]
            seqs.append(ids)
            n_prompt.append(min(len(prompt), len(ids)))
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long, device="cpu")
        attention = torch.zeros((len(seqs), width), dtype=torch.long, device="cpu")
        labels = torch.full((len(seqs), width), -100, dtype=torch.long, device="cpu")
        for i, (s, n) in enumerate(zip(seqs, n_prompt)):
            row = torch.tensor(s, dtype=torch.long, device="cpu")
            input_ids[i, : len(s)] = row
            attention[i, : len(s)] = 1
            labels[i, n: len(s)] = row[n:]
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


class ImageCollator:
    """Load image examples with PIL (converted to RGB) and run the image processor on the batch.

    Returns ``pixel_values`` (as produced by ``image_processor``) and ``labels`` (``torch.long``;
    omitted when the examples have no ``"label"``).
    """

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        import torch
        Image = require("PIL.Image", "image tasks")

        if not examples:
            raise ValueError("cannot collate an empty batch")
        images = []
        for ex in examples:
            try:
                with Image.open(ex["image_path"]) as img:
                    images.append(img.convert("RGB"))
            except (OSError, ValueError) as e:
                raise TaskError(f"cannot read image {ex['image_path']!r}: {e}") from None
        out = {"pixel_values": self.image_processor(images=images, return_tensors="pt")["pixel_values"]}
        if all("label" in ex and ex["label"] is not None for ex in examples):
            out["labels"] = torch.tensor([int(ex["label"]) for ex in examples], dtype=torch.long, device="cpu")
        return out
