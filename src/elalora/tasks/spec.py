"""Task specifications: :class:`TaskSpec`, the built-in GLUE / E2E / image / custom tasks, :func:`get_task`.

Imports: the standard library and :mod:`elalora.errors` only.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any


from ..errors import TaskError

__all__ = ["TaskError", "TaskSpec", "GLUE_TASKS", "OTHER_TASKS", "known_task_names", "get_task"]

# ---------------------------------------------------------------------------------------------
# Task specifications
# ---------------------------------------------------------------------------------------------


@dataclass
class TaskSpec:
    """Static description of a task.

    Attributes:
        name: Canonical task name, e.g. ``"rte"``.
        kind: ``"classification"``, ``"regression"``, ``"generation"`` or ``"image"``. A custom task
            that has not been loaded yet has kind ``"auto"`` (resolved by :func:`load_task_data`).
        num_labels: Number of classes; 1 for regression, 0 for generation (and for an
            ``image_folder`` or custom task whose classes are not known before loading).
        text_fields: Names of the input text columns (the Hub dataset's column names for GLUE,
            the file's column names for custom tasks); ``()`` for image tasks.
        metric_names: Keys produced by :func:`compute_metrics`; the main metric (used for model
            selection, :attr:`main_metric`) comes first.
        label_names: Label id -> name, or ``None`` for regression and generation. GLUE ids follow
            the Hugging Face ``glue`` dataset.
        label_field: Name of the label column (custom tasks and the Hub dataset).
        description: One-line human-readable description.
    """

    name: str
    kind: str
    num_labels: int
    text_fields: tuple[str, ...]
    metric_names: tuple[str, ...]
    label_names: list[str] | None
    label_field: str = "label"
    description: str = ""

    @property
    def main_metric(self) -> str:
        """The metric used to pick the best checkpoint (the first of :attr:`metric_names`)."""
        return self.metric_names[0]

    @property
    def is_pair(self) -> bool:
        """Whether examples have two input texts (``text_a`` and ``text_b``)."""
        return len(self.text_fields) == 2


def _glue(name, kind, num_labels, text_fields, metrics, label_names, description) -> TaskSpec:
    return TaskSpec(name=name, kind=kind, num_labels=num_labels, text_fields=tuple(text_fields),
                    metric_names=tuple(metrics), label_names=label_names, description=description)


#: The nine GLUE tasks. Metrics follow the GLUE benchmark (main metric first).
GLUE_TASKS: dict[str, TaskSpec] = {
    "cola": _glue("cola", "classification", 2, ("sentence",), ("matthews_correlation", "accuracy"),
                  ["unacceptable", "acceptable"],
                  "CoLA: grammatical acceptability of a sentence; Matthews correlation."),
    "sst2": _glue("sst2", "classification", 2, ("sentence",), ("accuracy",),
                  ["negative", "positive"],
                  "SST-2: binary sentiment of a movie-review sentence; accuracy."),
    "mrpc": _glue("mrpc", "classification", 2, ("sentence1", "sentence2"), ("f1", "accuracy"),
                  ["not_equivalent", "equivalent"],
                  "MRPC: whether two news sentences are paraphrases; F1 of the 'equivalent' class and accuracy."),
    "qqp": _glue("qqp", "classification", 2, ("question1", "question2"), ("f1", "accuracy"),
                 ["not_duplicate", "duplicate"],
                 "QQP: whether two Quora questions are duplicates; F1 of the 'duplicate' class and accuracy."),
    "stsb": _glue("stsb", "regression", 1, ("sentence1", "sentence2"), ("pearson", "spearmanr"), None,
                  "STS-B: semantic similarity score 0..5 of a sentence pair; Pearson and Spearman correlation."),
    "mnli": _glue("mnli", "classification", 3, ("premise", "hypothesis"), ("accuracy",),
                  ["entailment", "neutral", "contradiction"],
                  "MNLI: three-way natural language inference; accuracy on the matched dev set."),
    "qnli": _glue("qnli", "classification", 2, ("question", "sentence"), ("accuracy",),
                  ["entailment", "not_entailment"],
                  "QNLI: whether a Wikipedia sentence answers a question; accuracy."),
    "rte": _glue("rte", "classification", 2, ("sentence1", "sentence2"), ("accuracy",),
                 ["entailment", "not_entailment"],
                 "RTE: binary textual entailment; accuracy."),
    "wnli": _glue("wnli", "classification", 2, ("sentence1", "sentence2"), ("accuracy",),
                  ["not_entailment", "entailment"],
                  "WNLI: Winograd-schema entailment; accuracy."),
}

#: Tasks other than GLUE. ``custom`` and ``image_folder`` learn their labels when loaded.
OTHER_TASKS: dict[str, TaskSpec] = {
    "e2e_nlg": TaskSpec(
        name="e2e_nlg", kind="generation", num_labels=0, text_fields=("meaning_representation",),
        metric_names=("bleu", "rougeL"), label_names=None, label_field="reference",
        description="E2E NLG: restaurant description from a meaning representation; corpus BLEU "
                    "(sacrebleu, all references) and ROUGE-L F (best reference, averaged), both 0..100."),
    "image_folder": TaskSpec(
        name="image_folder", kind="image", num_labels=0, text_fields=(), metric_names=("accuracy",),
        label_names=None,
        description="Image classification from <data_dir>/train/<class>/ and <data_dir>/val/<class>/; accuracy."),
    "custom": TaskSpec(
        name="custom", kind="auto", num_labels=0, text_fields=(), metric_names=("accuracy",),
        label_names=None,
        description="Your own CSV/TSV/JSONL text classification (accuracy) or regression "
                    "(Pearson and Spearman correlation) data."),
}

_TASK_KINDS = ("classification", "regression", "generation", "image")


def normalize_task_name(name: str) -> str:
    return re.sub(r"[-_\s]", "", name.strip().lower())


_ALIASES: dict[str, str] = {normalize_task_name(n): n for n in (*GLUE_TASKS, *OTHER_TASKS)}
_ALIASES.update({"e2e": "e2e_nlg", "imagefolder": "image_folder", "images": "image_folder",
                 "mnlimatched": "mnli", "mnlim": "mnli"})


def known_task_names() -> list[str]:
    """Canonical names of all built-in tasks (GLUE first)."""
    return [*GLUE_TASKS, *OTHER_TASKS]


def get_task(name: str, **custom: Any) -> TaskSpec:
    """Return a fresh :class:`TaskSpec` for ``name``.

    Names are case-insensitive and ignore ``-``/``_`` (``"SST-2"``, ``"sts_b"`` work). Keyword
    arguments override fields of the returned spec, e.g.
    ``get_task("custom", kind="regression", text_fields=("question",), label_field="score")``;
    ``text_columns`` and ``label_column`` are accepted as aliases of ``text_fields`` and
    ``label_field``.

    Raises:
        TaskError: unknown task name, unknown override or invalid override value.
    """
    if not isinstance(name, str) or not name.strip():
        raise TaskError(f"task name must be a non-empty string; got {name!r}")
    canonical = _ALIASES.get(normalize_task_name(name))
    if canonical is None:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(known_task_names())}")
    base = GLUE_TASKS.get(canonical) or OTHER_TASKS[canonical]
    spec = dataclasses.replace(base, label_names=None if base.label_names is None else list(base.label_names))
    if not custom:
        return spec
    overrides = dict(custom)
    if "text_columns" in overrides:
        overrides["text_fields"] = overrides.pop("text_columns")
    if "label_column" in overrides:
        overrides["label_field"] = overrides.pop("label_column")
    allowed = {f.name for f in dataclasses.fields(TaskSpec)} - {"name"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise TaskError(f"unknown task option(s) {', '.join(unknown)} for task {canonical!r}; "
                        f"allowed: {', '.join(sorted(allowed | {'text_columns', 'label_column'}))}")
    for key, value in list(overrides.items()):
        if value is None and key not in ("label_names",):
            overrides.pop(key)
    if "text_fields" in overrides:
        overrides["text_fields"] = parse_columns(overrides["text_fields"])
    if "metric_names" in overrides:
        overrides["metric_names"] = tuple(overrides["metric_names"])
    if overrides.get("label_names") is not None:
        overrides["label_names"] = [str(x) for x in overrides["label_names"]]
        overrides.setdefault("num_labels", len(overrides["label_names"]))
    kind = overrides.get("kind")
    if kind is not None and kind not in (*_TASK_KINDS, "auto"):
        raise TaskError(f"unknown task kind {kind!r}; use one of {', '.join(_TASK_KINDS)}")
    if canonical == "custom" and kind == "regression":
        overrides.setdefault("num_labels", 1)
        overrides.setdefault("metric_names", ("pearson", "spearmanr"))
    return dataclasses.replace(spec, **overrides)


def parse_columns(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v for v in (s.strip() for s in value.split(",")) if v]
    cols = tuple(str(v) for v in value)
    if not 1 <= len(cols) <= 2:
        raise TaskError(f"give one or two text columns (e.g. 'sentence' or 'sentence1,sentence2'); got {list(cols)}")
    return cols
