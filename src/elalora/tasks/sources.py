"""Data loading: :func:`load_task_data` for GLUE (local TSV or the Hub), custom CSV/TSV/JSONL files,
E2E NLG and image folders; :class:`DataSpec`, the data a run reads, as one frozen value.

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

Imports: the standard library, numpy, :mod:`.spec`, :mod:`.e2e`, :mod:`.images`, :mod:`elalora.errors`,
:mod:`elalora._extras` is not needed: ``datasets`` (``elalora[hub]``) is imported lazily with its own message.
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from ..errors import TaskError
from .e2e import load_e2e
from .images import load_image_folder
from .spec import GLUE_TASKS, TaskSpec, get_task, known_task_names, normalize_task_name, parse_columns

__all__ = ["load_task_data", "DataSpec", "GLUE_HUB_DATASET"]

logger = logging.getLogger(__name__)

#: Hugging Face Hub dataset used for GLUE when no local ``data_dir`` is given.
GLUE_HUB_DATASET = "nyu-mll/glue"

# csv's default field size limit (128 KiB) is too small for some GLUE parse-tree columns.
_CSV_FIELD_LIMIT = 2**31 - 1

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
        train, evals = load_e2e(data_dir, train_path, eval_path)
    elif spec.name == "image_folder":
        if train_path is not None or eval_path is not None:
            raise TaskError("image_folder reads <data_dir>/train/<class>/ and <data_dir>/val/<class>/; "
                            "pass --data-dir instead of --train-file/--eval-file")
        train, evals, spec = load_image_folder(spec, data_dir)
    elif spec.name == "custom":
        train, evals, spec = _load_custom(spec, data_dir, train_path, eval_path, text_columns, label_column)
    else:
        raise TaskError(f"unknown task {spec.name!r}; known tasks: {', '.join(known_task_names())}")

    train = _subsample(train, max_train_samples, seed, shuffle=True)
    evals = _subsample(evals, max_eval_samples, seed + 1, shuffle=False)
    return train, evals, spec


@dataclass(frozen=True)
class DataSpec:
    """The data a run reads: the task, its files and columns, the sample limits and the subset seed.

    One value instead of the arguments of :func:`load_task_data`; built once per run (from a
    :class:`~elalora.recipe.RunSpec`, parsed flags or a run's ``config.json``: :meth:`from_fields`) and
    loaded with :meth:`load`. The fields are :func:`load_task_data`'s arguments of the same names
    (``task`` a name or a :class:`TaskSpec`); ``seed`` defaults to the recipe's 42.
    """

    task: str | TaskSpec
    data_dir: str | None = None
    train_file: str | None = None
    eval_file: str | None = None
    text_columns: str | None = None
    label_column: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    seed: int = 42

    @classmethod
    def from_fields(cls, source: Any, **given: Any) -> "DataSpec":
        """The fields of ``source`` that name a field here (attributes of an object such as a ``RunSpec`` or
        parsed arguments, or keys of a mapping such as a run's ``config.json``), then ``given``."""
        names = [f.name for f in dataclasses.fields(cls)]
        if isinstance(source, Mapping):
            found = {n: source[n] for n in names if n in source}
        else:
            found = {n: getattr(source, n) for n in names if hasattr(source, n)}
        return cls(**{**found, **given})

    def load(self) -> tuple[list[dict], list[dict], TaskSpec]:
        """``(train_examples, eval_examples, spec)``: :func:`load_task_data` on these fields."""
        return load_task_data(self.task, self.data_dir, max_train_samples=self.max_train_samples,
                              max_eval_samples=self.max_eval_samples, seed=self.seed, train_file=self.train_file,
                              eval_file=self.eval_file, text_columns=self.text_columns,
                              label_column=self.label_column)


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


def glue_layout(task: str) -> tuple[str, bool]:
    """(folder name, whether train.tsv has a header row) of a GLUE task, e.g. ``("CoLA", False)``."""
    if task not in _GLUE_FORMATS:
        raise ValueError(f"unknown GLUE task {task!r}; known: {', '.join(sorted(_GLUE_FORMATS))}")
    fmt = _GLUE_FORMATS[task]
    return fmt.folder, fmt.has_header


def _glue_task_dir(spec: TaskSpec, data_dir: Path) -> Path:
    """Find the task folder: ``<data_dir>/<Folder>`` (case/dash-insensitive) or ``data_dir`` itself."""
    fmt = _GLUE_FORMATS[spec.name]
    if not data_dir.is_dir():
        raise TaskError(f"GLUE data folder {str(data_dir)!r} does not exist; pass --data-dir with a local "
                        f"GLUE copy laid out as <dir>/{fmt.folder}/train.tsv")
    direct = data_dir / fmt.folder
    if direct.is_dir():
        return direct
    wanted = normalize_task_name(fmt.folder)
    for child in sorted(data_dir.iterdir()):
        if child.is_dir() and normalize_task_name(child.name) == wanted:
            return child
    if (data_dir / "train.tsv").is_file() or (data_dir / fmt.eval_file).is_file():
        if normalize_task_name(data_dir.name) in (wanted, spec.name):
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


# Over 80 lines: one linear validation of a user's files (find them, read, pick columns, infer the
# label kind, map labels), each step raising its own one-line TaskError in that order.
def _check_two_training_classes(train_classes: set, train_path, label_col) -> None:
    """Checked on the training split alone: an evaluation file with other labels does not make a
    one-class training set learnable."""
    if len(train_classes) < 2:
        raise TaskError(f"the training data {str(train_path)!r} has a single class "
                        f"{next(iter(train_classes), None)!r} in column {label_col!r}; classification needs at "
                        "least two classes in the training data")


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
        text_cols = parse_columns(text_columns)
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
        _check_two_training_classes({key(v) for v in train_raw}, train_path, label_col)
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
