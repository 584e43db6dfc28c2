"""Evaluation metrics of every task kind (accuracy / F1 / MCC, Pearson / Spearman, BLEU / ROUGE-L).

scikit-learn, scipy, sacrebleu and rouge-score come with ``elalora[tasks]`` and are imported lazily.

Imports: numpy, :mod:`.spec`, :mod:`elalora._extras`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .._extras import require
from .spec import TaskSpec

__all__ = ["compute_metrics"]

# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def _correlation(fn: Callable, preds: np.ndarray, labels: np.ndarray) -> float:
    """A scipy correlation; 0.0 when it is undefined (constant predictions or labels, < 2 points)."""
    if len(preds) < 2 or np.ptp(preds) == 0 or np.ptp(labels) == 0:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(fn(preds, labels)[0])
    return value if math.isfinite(value) else 0.0


def compute_metrics(spec: TaskSpec, predictions: Any, labels: Any) -> dict[str, float]:
    """Evaluation metrics of ``spec``, keyed as in ``spec.metric_names``.

    * classification / image: ``predictions`` are logits ``(n, num_labels)`` or class ids ``(n,)``;
      ``labels`` are class ids. ``accuracy`` (scikit-learn), ``f1`` of class 1 for MRPC and QQP,
      ``matthews_correlation`` (scikit-learn ``matthews_corrcoef``) for CoLA. Range 0..1 (MCC -1..1).
    * regression: ``predictions`` of shape ``(n,)`` or ``(n, 1)``; ``pearson`` and ``spearmanr``
      (scipy); 0.0 when undefined (e.g. constant predictions).
    * generation: ``predictions`` are generated strings, ``labels`` a list of reference lists.
      ``bleu`` is sacrebleu corpus BLEU (13a tokenisation, any number of references per example),
      ``rougeL`` the rouge-score ROUGE-L F-measure against the best reference, averaged over
      examples; both on a 0..100 scale.
    """
    if spec.kind == "generation":
        return _generation_metrics(predictions, labels)
    preds = _to_numpy(predictions)
    y = _to_numpy(labels)
    if len(preds) != len(y):
        raise ValueError(f"got {len(preds)} predictions for {len(y)} labels")
    if len(y) == 0:
        raise ValueError("cannot compute metrics on zero examples")
    if spec.kind == "regression":
        stats = require("scipy.stats", "regression metrics")
        pearsonr, spearmanr = stats.pearsonr, stats.spearmanr

        preds = preds.reshape(len(preds), -1)[:, 0].astype(np.float64)
        y = y.reshape(-1).astype(np.float64)
        values = {"pearson": _correlation(pearsonr, preds, y), "spearmanr": _correlation(spearmanr, preds, y)}
    elif spec.kind in ("classification", "image"):
        skm = require("sklearn.metrics", "classification metrics")
        accuracy_score, f1_score, matthews_corrcoef = skm.accuracy_score, skm.f1_score, skm.matthews_corrcoef

        if preds.ndim == 2:
            preds = preds.argmax(axis=-1)
        elif preds.ndim != 1:
            raise ValueError(f"classification predictions must be logits (n, k) or ids (n,); got shape {preds.shape}")
        preds = preds.astype(np.int64)
        y = y.reshape(-1).astype(np.int64)
        values = {"accuracy": float(accuracy_score(y, preds))}
        if "f1" in spec.metric_names:
            values["f1"] = float(f1_score(y, preds, pos_label=1, average="binary", zero_division=0.0))
        if "matthews_correlation" in spec.metric_names:
            values["matthews_correlation"] = float(matthews_corrcoef(y, preds))
    else:
        raise ValueError(f"no metrics for task kind {spec.kind!r}; load the task first")
    # Main metric first, in the order of spec.metric_names.
    ordered = {name: values[name] for name in spec.metric_names if name in values}
    ordered.update((k, v) for k, v in values.items() if k not in ordered)
    return ordered


def _generation_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    rouge_scorer = require("rouge_score.rouge_scorer", "ROUGE-L")
    BLEU = require("sacrebleu.metrics", "BLEU").BLEU

    predictions = [str(p).strip() for p in predictions]
    references = [[r] if isinstance(r, str) else list(r) for r in references]
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} reference lists")
    if not predictions:
        raise ValueError("cannot compute metrics on zero examples")
    if any(len(r) == 0 for r in references):
        raise ValueError("every prediction needs at least one reference")
    # sacrebleu wants reference streams: stream j holds the j-th reference of every example
    # (None where an example has fewer references).
    n_streams = max(len(r) for r in references)
    streams = [[r[j] if j < len(r) else None for r in references] for j in range(n_streams)]
    bleu = BLEU(force=True).corpus_score(predictions, streams).score  # force: E2E text is pre-tokenised
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = float(np.mean([scorer.score_multi(refs, pred)["rougeL"].fmeasure
                           for pred, refs in zip(predictions, references)]))
    return {"bleu": float(bleu), "rougeL": 100.0 * rouge}
