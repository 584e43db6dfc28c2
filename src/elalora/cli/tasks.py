"""Task definitions, data loading, tokenisation, batch collation and metrics for the ``elalora`` CLI.

Supported tasks
---------------

* **GLUE** (``cola sst2 mrpc qqp stsb mnli qnli rte wnli``), read either from a local copy in the
  standard ``download_glue_data.py`` layout (``<data_dir>/RTE/train.tsv`` and ``dev.tsv``; MNLI uses
  ``dev_matched.tsv``) or, when no ``data_dir`` is given, from the Hugging Face Hub dataset
  ``nyu-mll/glue`` (needs the optional ``datasets`` package and network access). Label ids follow the
  Hub dataset, so both sources give identical examples.
* **custom**: a classification or regression task from your own CSV, TSV or JSONL files; the kind is
  inferred from the label column (integers or strings -> classification, other numbers -> regression).
* **e2e_nlg**: the E2E NLG data-to-text task (``meaning representation||reference`` lines), for causal
  language models. Evaluated with corpus BLEU and ROUGE-L against all references of a meaning
  representation.
* **image_folder**: image classification from ``<data_dir>/train/<class>/*.png`` and
  ``<data_dir>/val/<class>/...``.

Examples are plain dicts, so they can be used with any model or training loop:

* text classification / regression: ``{"text_a": str, "text_b": str (pair tasks only), "label": int | float}``
* generation: ``{"prompt": str, "target": str, "references": list[str]}``
* image: ``{"image_path": str, "label": int}``

Every problem with the user's data or arguments raises :class:`TaskError` with a one-line message
that says what is wrong and what to do about it. Recoverable oddities (e.g. a malformed row in a
large GLUE file) are skipped and reported through :mod:`logging`; this module never prints.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import random
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "TaskError",
    "TaskSpec",
    "GLUE_TASKS",
    "OTHER_TASKS",
    "known_task_names",
    "get_task",
    "load_task_data",
    "build_prompt",
    "TextClassificationCollator",
    "CausalLMCollator",
    "encode_prompts",
    "ImageCollator",
    "compute_metrics",
    "metric_for_best",
]

logger = logging.getLogger(__name__)

#: Hugging Face Hub dataset used for GLUE when no local ``data_dir`` is given.
GLUE_HUB_DATASET = "nyu-mll/glue"

#: File extensions recognised as images by the ``image_folder`` task (lower case).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# csv's default field size limit (128 KiB) is too small for some GLUE parse-tree columns.
_CSV_FIELD_LIMIT = 2**31 - 1


class TaskError(ValueError):
    """A problem with the task name, the data files or the data-related arguments.

    The message is a single line naming what is wrong and how to fix it, suitable for showing to a
    command-line user without a traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


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
            selection, see :func:`metric_for_best`) comes first.
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


def _norm_name(name: str) -> str:
    return re.sub(r"[-_\s]", "", name.strip().lower())


_ALIASES: dict[str, str] = {_norm_name(n): n for n in (*GLUE_TASKS, *OTHER_TASKS)}
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
    canonical = _ALIASES.get(_norm_name(name))
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
        overrides["text_fields"] = _as_columns(overrides["text_fields"])
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


def _as_columns(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v for v in (s.strip() for s in value.split(",")) if v]
    cols = tuple(str(v) for v in value)
    if not 1 <= len(cols) <= 2:
        raise TaskError(f"give one or two text columns (e.g. 'sentence' or 'sentence1,sentence2'); got {list(cols)}")
    return cols


# ---------------------------------------------------------------------------------------------
# Subsampling
# ---------------------------------------------------------------------------------------------


def _check_max(value: int | None, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise TaskError(f"{what} must be a positive integer or None; got {value!r}")


def _subsample(examples: list[dict], n: int | None, seed: int, *, shuffle: bool) -> list[dict]:
    """Deterministic subset of ``n`` examples.

    With ``shuffle`` (training) the examples are shuffled with ``random.Random(seed)`` and the first
    ``n`` kept, in shuffled order; otherwise (evaluation) a seeded random subset is kept in the
    original file order. ``n=None`` or ``n >= len(examples)`` returns all examples unchanged.
    """
    if n is None or n >= len(examples):
        return list(examples)
    rng = random.Random(seed)
    if shuffle:
        order = list(range(len(examples)))
        rng.shuffle(order)
        return [examples[i] for i in order[:n]]
    keep = sorted(rng.sample(range(len(examples)), n))
    return [examples[i] for i in keep]


# ---------------------------------------------------------------------------------------------
# Public loader
# ---------------------------------------------------------------------------------------------


def load_task_data(
    task: TaskSpec | str,
    data_dir: str | os.PathLike | None,
    *,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
    train_file: str | os.PathLike | None = None,
    eval_file: str | os.PathLike | None = None,
    text_columns: Sequence[str] | str | None = None,
    label_column: str | None = None,
) -> tuple[list[dict], list[dict], TaskSpec]:
    """Load the training and evaluation examples of a task.

    Args:
        task: A task name (see :func:`known_task_names`) or a :class:`TaskSpec` from :func:`get_task`.
        data_dir: Data folder. GLUE: the folder holding ``RTE/``, ``MRPC/``... (or the task folder
            itself); ``None`` downloads from the Hugging Face Hub. ``e2e_nlg``: the folder holding
            ``e2e_nlg/`` or the ``e2e_nlg`` folder itself. ``image_folder``: the folder with
            ``train/`` and ``val/`` (or ``validation/``, ``test/``). ``custom``: optional folder with
            ``train.{csv,tsv,jsonl}`` and ``dev``/``validation``/``val``/``eval``/``test`` files,
            used when ``train_file``/``eval_file`` are not given.
        max_train_samples: Keep a seeded random subset of this many training examples (shuffled).
        max_eval_samples: Keep a seeded random subset of this many evaluation examples (file order;
            for ``e2e_nlg`` this counts meaning representations).
        seed: Seed of the subsampling.
        train_file, eval_file: Explicit data files. Required for ``custom`` unless ``data_dir`` holds
            them; for GLUE and ``e2e_nlg`` they replace the default files of ``data_dir``.
        text_columns: One or two input columns of a custom task (default: the spec's
            ``text_fields``, else ``text``/``sentence``/``sentence1,sentence2`` when present).
        label_column: Label column of a custom task (default: the spec's ``label_field``, ``label``).
            Integer or string labels make a classification task (classes sorted, numerically for
            integers), other numbers a regression task; for integer-valued scores use
            ``get_task("custom", kind="regression")``.

    Returns:
        ``(train_examples, eval_examples, spec)``. ``spec`` is complete: for ``custom`` and
        ``image_folder`` it carries the kind, number of labels and label names found in the data.

    Raises:
        TaskError: unknown task, missing files or columns, unusable labels, bad arguments.
    """
    spec = get_task(task) if isinstance(task, str) else task
    if not isinstance(spec, TaskSpec):
        raise TaskError(f"task must be a task name or a TaskSpec; got {type(task).__name__}")
    _check_max(max_train_samples, "max_train_samples")
    _check_max(max_eval_samples, "max_eval_samples")
    if not isinstance(seed, int):
        raise TaskError(f"seed must be an integer; got {seed!r}")
    data_dir = None if data_dir is None else Path(data_dir).expanduser()
    train_path = None if train_file is None else Path(train_file).expanduser()
    eval_path = None if eval_file is None else Path(eval_file).expanduser()
    if spec.name != "custom" and (text_columns is not None or label_column is not None):
        raise TaskError(f"text_columns/label_column only apply to task 'custom', not {spec.name!r}; "
                        "drop --text-columns/--label-column or use --task custom")

    if spec.name in GLUE_TASKS:
        if data_dir is None and train_path is None and eval_path is None:
            train, evals = _load_glue_hub(spec)
        else:
            train, evals = _load_glue_local(spec, data_dir, train_path, eval_path)
    elif spec.name == "e2e_nlg":
        train, evals = _load_e2e(data_dir, train_path, eval_path)
    elif spec.name == "image_folder":
        if train_path is not None or eval_path is not None:
            raise TaskError("image_folder reads <data_dir>/train/<class>/ and <data_dir>/val/<class>/; "
                            "pass --data-dir instead of --train-file/--eval-file")
        train, evals, spec = _load_image_folder(spec, data_dir)
    elif spec.name == "custom":
        train, evals, spec = _load_custom(spec, data_dir, train_path, eval_path, text_columns, label_column)
    else:
        raise TaskError(f"unknown task {spec.name!r}; known tasks: {', '.join(known_task_names())}")

    train = _subsample(train, max_train_samples, seed, shuffle=True)
    evals = _subsample(evals, max_eval_samples, seed + 1, shuffle=False)
    return train, evals, spec


# ---------------------------------------------------------------------------------------------
# GLUE
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GlueFormat:
    """Column layout of one GLUE TSV file (as written by ``download_glue_data.py``)."""

    folder: str
    eval_file: str
    has_header: bool
    # Column names (header mode) or indices (headerless) of the text fields.
    text_cols: tuple[str | int, ...]
    # Column name/index of the label, or ``-1`` for the last field of the row.
    label_col: str | int
    min_fields: int


_GLUE_FORMATS: dict[str, _GlueFormat] = {
    # CoLA has no header: source, label, original mark, sentence.
    "cola": _GlueFormat("CoLA", "dev.tsv", False, (3,), 1, 4),
    "sst2": _GlueFormat("SST-2", "dev.tsv", True, ("sentence",), -1, 2),
    "mrpc": _GlueFormat("MRPC", "dev.tsv", True, ("#1 String", "#2 String"), "Quality", 5),
    "qqp": _GlueFormat("QQP", "dev.tsv", True, ("question1", "question2"), -1, 6),
    "stsb": _GlueFormat("STS-B", "dev.tsv", True, ("sentence1", "sentence2"), -1, 10),
    "mnli": _GlueFormat("MNLI", "dev_matched.tsv", True, ("sentence1", "sentence2"), -1, 12),
    "qnli": _GlueFormat("QNLI", "dev.tsv", True, ("question", "sentence"), -1, 4),
    "rte": _GlueFormat("RTE", "dev.tsv", True, ("sentence1", "sentence2"), -1, 4),
    "wnli": _GlueFormat("WNLI", "dev.tsv", True, ("sentence1", "sentence2"), -1, 4),
}


def _glue_task_dir(spec: TaskSpec, data_dir: Path) -> Path:
    """Find the task folder: ``<data_dir>/<Folder>`` (case/dash-insensitive) or ``data_dir`` itself."""
    fmt = _GLUE_FORMATS[spec.name]
    if not data_dir.is_dir():
        raise TaskError(f"GLUE data folder {str(data_dir)!r} does not exist; pass --data-dir with a local "
                        f"GLUE copy laid out as <dir>/{fmt.folder}/train.tsv")
    direct = data_dir / fmt.folder
    if direct.is_dir():
        return direct
    wanted = _norm_name(fmt.folder)
    for child in sorted(data_dir.iterdir()):
        if child.is_dir() and _norm_name(child.name) == wanted:
            return child
    if (data_dir / "train.tsv").is_file() or (data_dir / fmt.eval_file).is_file():
        if _norm_name(data_dir.name) in (wanted, spec.name):
            return data_dir
    raise TaskError(f"no {fmt.folder} folder in {str(data_dir)!r}; expected "
                    f"{str(data_dir / fmt.folder / 'train.tsv')!r} (standard GLUE layout)")


def _load_glue_local(spec: TaskSpec, data_dir: Path | None, train_path: Path | None,
                     eval_path: Path | None) -> tuple[list[dict], list[dict]]:
    fmt = _GLUE_FORMATS[spec.name]
    task_dir = None
    if train_path is None or eval_path is None:
        if data_dir is None:
            raise TaskError(f"give both --train-file and --eval-file for {spec.name}, or --data-dir "
                            "with a local GLUE copy")
        task_dir = _glue_task_dir(spec, data_dir)
    train_path = train_path or task_dir / "train.tsv"
    eval_path = eval_path or task_dir / fmt.eval_file
    return _read_glue_tsv(spec, train_path), _read_glue_tsv(spec, eval_path)


def _read_tsv_rows(path: Path) -> list[list[str]]:
    if not path.is_file():
        raise TaskError(f"data file {str(path)!r} not found")
    old_limit = csv.field_size_limit()
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    try:
        # utf-8-sig drops the byte-order mark that starts the MRPC files.
        with open(path, encoding="utf-8-sig", newline="") as f:
            return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except UnicodeDecodeError as e:
        raise TaskError(f"{str(path)!r} is not valid UTF-8 text ({e.reason} at byte {e.start})") from None
    finally:
        csv.field_size_limit(old_limit)


def _parse_glue_label(spec: TaskSpec, raw: str) -> int | float:
    raw = raw.strip()
    if spec.kind == "regression":
        value = float(raw)
        if not math.isfinite(value):
            raise ValueError(raw)
        return value
    names = spec.label_names or []
    if raw in names:
        return names.index(raw)
    value = int(raw)
    if not 0 <= value < spec.num_labels:
        raise ValueError(raw)
    return value


def _read_glue_tsv(spec: TaskSpec, path: Path) -> list[dict]:
    """Parse one GLUE TSV file into examples.

    Rows with more fields than the header (a stray tab in a text) still load: text columns are
    read by position from the front and a trailing label from the end; in single-sentence files
    (CoLA, SST-2) the extra fields are joined back into the sentence. Rows with too few fields or
    an unreadable label are skipped and reported with a logging warning.
    """
    fmt = _GLUE_FORMATS[spec.name]
    rows = _read_tsv_rows(path)
    while rows and not any(cell.strip() for cell in rows[-1]):
        rows.pop()
    if fmt.has_header:
        if not rows:
            raise TaskError(f"GLUE file {str(path)!r} is empty")
        header = [h.strip() for h in rows[0]]
        first_line = 2

        def col(c: str | int) -> int:
            if isinstance(c, int):
                return c
            if c not in header:
                raise TaskError(f"column {c!r} not found in {str(path)!r}; available columns: "
                                f"{', '.join(header)}; is this the {fmt.folder} file of GLUE?")
            return header.index(c)

        text_idx = [col(c) for c in fmt.text_cols]
        label_idx = col(fmt.label_col)
        min_fields = max(len(header), fmt.min_fields) if label_idx == -1 else max(text_idx + [label_idx]) + 1
        body = rows[1:]
    else:
        text_idx, label_idx, min_fields, body, first_line = list(fmt.text_cols), fmt.label_col, fmt.min_fields, rows, 1

    examples: list[dict] = []
    skipped: list[int] = []
    for lineno, row in enumerate(body, start=first_line):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < min_fields:
            skipped.append(lineno)
            continue
        try:
            label = _parse_glue_label(spec, row[label_idx])
        except ValueError:
            skipped.append(lineno)
            continue
        texts = [row[i] for i in text_idx]
        if not fmt.has_header and len(row) > min_fields:
            # Headerless CoLA: the sentence is the last column and may itself contain tabs.
            texts[-1] = "\t".join(row[text_idx[-1]:])
        elif fmt.has_header and len(text_idx) == 1 and label_idx == -1 and len(row) > len(header):
            # Single-sentence file (SST-2): every field between the sentence and the label is text.
            texts[0] = "\t".join(row[text_idx[0]:-1])
        ex: dict[str, Any] = {"text_a": texts[0]}
        if len(texts) > 1:
            ex["text_b"] = texts[1]
        ex["label"] = label
        examples.append(ex)
    if skipped:
        logger.warning("%s: skipped %d malformed row(s) (too few fields or unreadable label), first at line %d",
                       path, len(skipped), skipped[0])
    if not examples:
        raise TaskError(f"no usable rows in {str(path)!r}; is this the {fmt.folder} file of GLUE?")
    return examples


def _load_glue_hub(spec: TaskSpec) -> tuple[list[dict], list[dict]]:
    """Load a GLUE task from the Hugging Face Hub dataset :data:`GLUE_HUB_DATASET`."""
    hint = (f"pass --data-dir with a local GLUE copy (<dir>/{_GLUE_FORMATS[spec.name].folder}/train.tsv)")
    try:
        import datasets  # noqa: PLC0415  (optional dependency, imported lazily)
    except ImportError:
        raise TaskError(f"loading GLUE from the Hugging Face Hub needs the 'datasets' package "
                        f"(pip install 'elalora[hub]'); or {hint}") from None
    eval_split = "validation_matched" if spec.name == "mnli" else "validation"
    try:
        ds = datasets.load_dataset(GLUE_HUB_DATASET, spec.name)
        splits = (ds["train"], ds[eval_split])
    except Exception as e:  # network, offline mode, cache or hub errors: all mean "no data"
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise TaskError(f"could not load GLUE task {spec.name!r} from the Hugging Face Hub "
                        f"({type(e).__name__}: {reason}); {hint}") from None
    out = []
    for split in splits:
        columns = [split[c] for c in spec.text_fields]
        labels = split[spec.label_field]
        examples = []
        for i, label in enumerate(labels):
            ex: dict[str, Any] = {"text_a": columns[0][i]}
            if len(columns) > 1:
                ex["text_b"] = columns[1][i]
            ex["label"] = float(label) if spec.kind == "regression" else int(label)
            examples.append(ex)
        out.append(examples)
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------
# Custom CSV / TSV / JSONL tasks
# ---------------------------------------------------------------------------------------------

_TABLE_EXTENSIONS = (".csv", ".tsv", ".tab", ".jsonl", ".ndjson", ".json")
_EVAL_STEMS = ("dev", "validation", "val", "eval", "test")
_DEFAULT_TEXT_COLUMNS = (("text",), ("sentence",), ("sentence1", "sentence2"), ("text_a", "text_b"))
_INT_RE = re.compile(r"^[+-]?\d+$")


def _read_table(path: Path) -> tuple[list[dict], list[str]]:
    """Read a CSV, TSV (no quoting) or JSON Lines file into ``(rows, column_names)``."""
    if not path.is_file():
        raise TaskError(f"data file {str(path)!r} not found")
    ext = path.suffix.lower()
    if ext not in _TABLE_EXTENSIONS:
        raise TaskError(f"cannot read {str(path)!r}: unknown extension {ext or '(none)'!r}; "
                        "use .csv, .tsv or .jsonl")
    try:
        if ext in (".jsonl", ".ndjson", ".json"):
            return _read_json_rows(path)
        old_limit = csv.field_size_limit()
        csv.field_size_limit(_CSV_FIELD_LIMIT)
        try:
            with open(path, encoding="utf-8-sig", newline="") as f:
                if ext == ".csv":
                    reader = csv.DictReader(f)
                else:
                    reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
                rows = [r for r in reader if any((v or "").strip() for v in r.values() if isinstance(v, str))]
                columns = [c.strip() for c in (reader.fieldnames or [])]
        finally:
            csv.field_size_limit(old_limit)
    except UnicodeDecodeError as e:
        raise TaskError(f"{str(path)!r} is not valid UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise TaskError(f"cannot parse {str(path)!r} as {ext[1:].upper()}: {e}") from None
    rows = [{(k.strip() if isinstance(k, str) else k): v for k, v in r.items()} for r in rows]
    return rows, columns


def _read_json_rows(path: Path) -> tuple[list[dict], list[str]]:
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    rows: list[Any]
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise TaskError(f"{str(path)!r} is not valid JSON ({e.msg} at line {e.lineno})") from None
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise TaskError(f"{str(path)!r} line {lineno} is not valid JSON ({e.msg}); "
                                "JSONL files need one JSON object per line") from None
    columns: list[str] = []
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise TaskError(f"{str(path)!r} record {i} is a {type(row).__name__}, not a JSON object")
        for k in row:
            if k not in columns:
                columns.append(k)
    return rows, columns


def _find_split_file(data_dir: Path, stems: Sequence[str]) -> Path | None:
    for stem in stems:
        for ext in _TABLE_EXTENSIONS:
            p = data_dir / f"{stem}{ext}"
            if p.is_file():
                return p
    return None


def _label_kind(values: list[Any]) -> str:
    """``"int"``, ``"float"`` or ``"str"``: how a custom label column looks."""
    kinds = set()
    for v in values:
        if isinstance(v, bool):
            kinds.add("str")
        elif isinstance(v, int):
            kinds.add("int")
        elif isinstance(v, float):  # a JSON float, even 3.0, marks a regression target
            kinds.add("float" if math.isfinite(v) else "str")
        else:
            s = str(v).strip()
            if _INT_RE.match(s):
                kinds.add("int")
            else:
                try:
                    f = float(s)
                    kinds.add("float" if math.isfinite(f) else "str")
                except ValueError:
                    kinds.add("str")
    if "str" in kinds:
        return "str"
    if "float" in kinds:
        return "float"
    return "int"


def _load_custom(spec: TaskSpec, data_dir: Path | None, train_path: Path | None, eval_path: Path | None,
                 text_columns: Sequence[str] | str | None, label_column: str | None
                 ) -> tuple[list[dict], list[dict], TaskSpec]:
    """Load a custom text task; see :func:`load_task_data`."""
    if data_dir is not None and (train_path is None or eval_path is None):
        if not data_dir.is_dir():
            raise TaskError(f"data folder {str(data_dir)!r} does not exist")
        train_path = train_path or _find_split_file(data_dir, ("train",))
        eval_path = eval_path or _find_split_file(data_dir, _EVAL_STEMS)
    if train_path is None:
        raise TaskError("task 'custom' needs a training file: pass --train-file (CSV, TSV or JSONL)")
    if eval_path is None:
        raise TaskError("task 'custom' needs an evaluation file: pass --eval-file (CSV, TSV or JSONL)")
    if spec.kind not in ("auto", "classification", "regression"):
        raise TaskError(f"custom tasks are text classification or regression, not {spec.kind!r}")

    train_rows, train_cols = _read_table(train_path)
    eval_rows, eval_cols = _read_table(eval_path)
    if not train_rows:
        raise TaskError(f"training file {str(train_path)!r} has no data rows")
    if not eval_rows:
        raise TaskError(f"evaluation file {str(eval_path)!r} has no data rows")

    if text_columns is not None:
        text_cols = _as_columns(text_columns)
    elif spec.text_fields:
        text_cols = tuple(spec.text_fields)
    else:
        text_cols = next((c for c in _DEFAULT_TEXT_COLUMNS if all(x in train_cols for x in c)), None)
        if text_cols is None:
            raise TaskError(f"pass --text-columns naming the input column(s) of {str(train_path)!r}; "
                            f"available columns: {', '.join(map(str, train_cols))}")
    label_col = label_column or spec.label_field or "label"
    for path, cols in ((train_path, train_cols), (eval_path, eval_cols)):
        for c in (*text_cols, label_col):
            if c not in cols:
                flag = "--label-column" if c == label_col else "--text-columns"
                raise TaskError(f"column {c!r} not found in {str(path)!r}; available columns: "
                                f"{', '.join(map(str, cols))} (choose with {flag})")

    def raw_labels(rows: list[dict], path: Path) -> list[Any]:
        out = []
        for i, row in enumerate(rows, start=1):
            v = row.get(label_col)
            if v is None or (isinstance(v, str) and not v.strip()):
                raise TaskError(f"row {i} of {str(path)!r} has no value in label column {label_col!r}")
            out.append(v.strip() if isinstance(v, str) else v)
        return out

    train_raw = raw_labels(train_rows, train_path)
    eval_raw = raw_labels(eval_rows, eval_path)
    kind = spec.kind
    value_kind = _label_kind(train_raw + eval_raw)
    if kind == "auto":
        kind = "regression" if value_kind == "float" else "classification"

    if kind == "regression":
        def to_float(v: Any, path: Path) -> float:
            try:
                f = float(v)
            except (TypeError, ValueError):
                f = float("nan")
            if isinstance(v, bool) or not math.isfinite(f):
                raise TaskError(f"regression label {v!r} in {str(path)!r} is not a finite number")
            return f
        train_y = [to_float(v, train_path) for v in train_raw]
        eval_y = [to_float(v, eval_path) for v in eval_raw]
        label_names = None
        num_labels = 1
        metric_names = ("pearson", "spearmanr")
    else:
        def key(v: Any) -> str:
            if value_kind == "int":
                return str(int(v))
            return str(v).strip() if not isinstance(v, bool) else str(v).lower()
        if spec.label_names:
            label_names = list(spec.label_names)
        else:
            distinct = {key(v) for v in train_raw + eval_raw}
            label_names = sorted(distinct, key=int) if value_kind == "int" else sorted(distinct)
        if len(label_names) < 2:
            raise TaskError(f"label column {label_col!r} has a single value {label_names[0]!r}; "
                            "classification needs at least two classes")
        train_classes = {key(v) for v in train_raw}
        if len(train_classes) < 2:
            # checked on the training split alone: an evaluation file with other labels does not
            # make a one-class training set learnable
            raise TaskError(f"the training data {str(train_path)!r} has a single class "
                            f"{next(iter(train_classes), None)!r} in column {label_col!r}; classification needs at "
                            "least two classes in the training data")
        index = {n: i for i, n in enumerate(label_names)}

        def to_id(v: Any, path: Path) -> int:
            k = key(v)
            if k not in index:
                raise TaskError(f"label {k!r} in {str(path)!r} is not one of the task's labels "
                                f"({', '.join(label_names)})")
            return index[k]
        train_y = [to_id(v, train_path) for v in train_raw]
        eval_y = [to_id(v, eval_path) for v in eval_raw]
        num_labels = len(label_names)
        metric_names = spec.metric_names if spec.kind == "classification" else ("accuracy",)

    def build(rows: list[dict], ys: list, path: Path) -> list[dict]:
        out = []
        for i, (row, y) in enumerate(zip(rows, ys), start=1):
            texts = []
            for c in text_cols:
                v = row.get(c)
                if v is None:
                    raise TaskError(f"row {i} of {str(path)!r} has no value in text column {c!r}")
                texts.append(v if isinstance(v, str) else str(v))
            ex: dict[str, Any] = {"text_a": texts[0]}
            if len(texts) > 1:
                ex["text_b"] = texts[1]
            ex["label"] = y
            out.append(ex)
        return out

    resolved = dataclasses.replace(spec, kind=kind, num_labels=num_labels, text_fields=text_cols,
                                   metric_names=tuple(metric_names), label_names=label_names,
                                   label_field=label_col)
    return build(train_rows, train_y, train_path), build(eval_rows, eval_y, eval_path), resolved


# ---------------------------------------------------------------------------------------------
# E2E NLG
# ---------------------------------------------------------------------------------------------


def _e2e_dir(data_dir: Path | None) -> Path:
    if data_dir is None:
        raise TaskError("task 'e2e_nlg' needs --data-dir: a folder with e2e_nlg/valid.txt and e2e_nlg/test.txt")
    for cand in (data_dir / "e2e_nlg", data_dir / "e2e", data_dir):
        if (cand / "valid.txt").is_file() or (cand / "test.txt").is_file():
            return cand
    raise TaskError(f"no E2E files in {str(data_dir)!r}; expected "
                    f"{str(data_dir / 'e2e_nlg' / 'valid.txt')!r} and test.txt ('MR||reference' lines)")


def _read_e2e_pairs(path: Path) -> list[tuple[str, str]]:
    """Read ``meaning representation||reference`` lines; malformed lines are skipped with a warning."""
    if not path.is_file():
        raise TaskError(f"data file {str(path)!r} not found")
    pairs, bad = [], []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            mr, sep, ref = line.partition("||")
            mr, ref = mr.strip(), ref.strip()
            if not sep or not mr or not ref:
                bad.append(lineno)
                continue
            pairs.append((mr, ref))
    if bad:
        logger.warning("%s: skipped %d line(s) without 'MR||reference', first at line %d", path, len(bad), bad[0])
    if not pairs:
        raise TaskError(f"no 'meaning representation||reference' lines in {str(path)!r}")
    return pairs


def _group_by_mr(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for mr, ref in pairs:
        groups.setdefault(mr, []).append(ref)
    return groups


def _load_e2e(data_dir: Path | None, train_path: Path | None, eval_path: Path | None
              ) -> tuple[list[dict], list[dict]]:
    """E2E NLG: train on one example per line of ``valid.txt``; evaluate on ``test.txt`` grouped by MR.

    The public training file is not part of the shared data, so by default the model trains on the
    official dev set (``valid.txt``) and is evaluated on the test set. ``train_file``/``eval_file``
    (e.g. the official ``train.txt``) replace these defaults.
    """
    if train_path is None or eval_path is None:
        folder = _e2e_dir(data_dir)
        train_path = train_path or folder / "valid.txt"
        eval_path = eval_path or folder / "test.txt"
    train_pairs = _read_e2e_pairs(train_path)
    train_refs = _group_by_mr(train_pairs)
    train = [{"prompt": mr, "target": ref, "references": list(train_refs[mr])} for mr, ref in train_pairs]
    evals = [{"prompt": mr, "target": refs[0], "references": refs}
             for mr, refs in _group_by_mr(_read_e2e_pairs(eval_path)).items()]
    return train, evals


def build_prompt(example: Mapping[str, Any] | str) -> str:
    """Prompt text for a generation example: ``"<meaning representation>\\nDescription:"``.

    ``example`` is a generation example (its ``"prompt"`` holds the meaning representation) or the
    meaning representation itself. The model is trained to continue the prompt with
    ``" " + target + EOS`` (see :class:`CausalLMCollator`), so at generation time the text produced
    after the prompt, up to EOS, is the description.
    """
    mr = example if isinstance(example, str) else example["prompt"]
    return f"{str(mr).strip()}\nDescription:"


# ---------------------------------------------------------------------------------------------
# Image folder
# ---------------------------------------------------------------------------------------------


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _load_image_folder(spec: TaskSpec, data_dir: Path | None) -> tuple[list[dict], list[dict], TaskSpec]:
    """Image classification from ``<data_dir>/train/<class>/`` and ``<data_dir>/{val,validation,test}/<class>/``.

    Class names are the sorted names of the class folders under ``train/``; label ids index them.
    Images are found recursively inside each class folder and listed in sorted path order.
    """
    if data_dir is None:
        raise TaskError("task 'image_folder' needs --data-dir: a folder with train/<class>/ and val/<class>/")
    if not data_dir.is_dir():
        raise TaskError(f"image folder {str(data_dir)!r} does not exist")
    train_dir = data_dir / "train"
    if not train_dir.is_dir():
        raise TaskError(f"no train/ folder in {str(data_dir)!r}; expected <data_dir>/train/<class>/*.png")
    eval_dir = next((data_dir / n for n in ("val", "validation", "test") if (data_dir / n).is_dir()), None)
    if eval_dir is None:
        raise TaskError(f"no val/ (or validation/, test/) folder in {str(data_dir)!r}; "
                        "expected <data_dir>/val/<class>/*.png")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise TaskError(f"{str(train_dir)!r} must contain at least two class folders; found {classes}")
    if spec.label_names:
        if sorted(spec.label_names) != classes and list(spec.label_names) != classes:
            raise TaskError(f"class folders {classes} in {str(train_dir)!r} do not match the task's "
                            f"label names {spec.label_names}")
        classes = list(spec.label_names)
    index = {c: i for i, c in enumerate(classes)}

    def collect(split_dir: Path) -> list[dict]:
        out = []
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if class_dir.name not in index:
                raise TaskError(f"class folder {str(class_dir)!r} has no counterpart in {str(train_dir)!r}; "
                                f"known classes: {', '.join(classes)}")
            out.extend({"image_path": str(p), "label": index[class_dir.name]} for p in _list_images(class_dir))
        if not out:
            raise TaskError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {str(split_dir)!r}")
        return out

    train, evals = collect(train_dir), collect(eval_dir)
    resolved = dataclasses.replace(spec, num_labels=len(classes), label_names=list(classes))
    return train, evals, resolved


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
            out["labels"] = torch.tensor([ex["label"] for ex in examples], dtype=dtype)
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


def _eos_id(tokenizer: Any) -> int:
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
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            input_ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
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
        self.eos_id = _eos_id(tokenizer)
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
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        for i, (s, n) in enumerate(zip(seqs, n_prompt)):
            row = torch.tensor(s, dtype=torch.long)
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
        from PIL import Image

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
            out["labels"] = torch.tensor([int(ex["label"]) for ex in examples], dtype=torch.long)
        return out


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def metric_for_best(spec: TaskSpec) -> str:
    """Name of the main metric of ``spec`` (higher is better for every built-in metric)."""
    return spec.metric_names[0]


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
        from scipy.stats import pearsonr, spearmanr

        preds = preds.reshape(len(preds), -1)[:, 0].astype(np.float64)
        y = y.reshape(-1).astype(np.float64)
        values = {"pearson": _correlation(pearsonr, preds, y), "spearmanr": _correlation(spearmanr, preds, y)}
    elif spec.kind in ("classification", "image"):
        from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

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
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

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
