"""The run directory of ``elalora train`` and the adapter directories inside it: the layout, the
checks before writing, and reading back what a run recorded (its config, the adapter's task).

A run directory holds::

    adapter/             elalora adapter (PEFT-trained methods: the PEFT adapter)
    peft/                plain PEFT LoRA adapter (loads with peft.PeftModel.from_pretrained)
    metrics.json         final metrics, evaluation history, train-loss history, runtime, parameter counts, ranks
    rank_history.jsonl   one rank change per line (step, module, old_rank, new_rank, scores, ...)
    config.json          the full run configuration (resolved schedule, versions, command line)
    gelora_plan.json     GeLoRA methods: intrinsic dimensions and the planned ranks
    figures/*.png        rank heatmap, rank over time, score distribution, intrinsic dimensions

The checks never let a job delete what elalora did not write: a run directory is recognised by the
run marker (``"elalora_run": true`` in its config.json; a Hugging Face model folder also has a
config.json), an export folder by its marker file ``elalora_export.json``, the inputs of the job
(the ``--model`` folder, the data, the adapter being exported) are never inside the output, and
:func:`output_lock` keeps a second live job out of the same directory.

Every file of a run is read and checked by :mod:`elalora.validation` (file names, :class:`AdapterDir`,
the run's config.json).

Imports: the standard library, :mod:`elalora._io`, :mod:`elalora.validation`, :mod:`.loading`,
:mod:`elalora.errors`.
"""

from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path

from .._io import output_lock, read_json as _read_json, recover_interrupted_swap, write_json
from ..errors import ElaLoRAError, RunError
from ..validation import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, HEAD_CONFIG, METRICS, RANK_HISTORY, RUN_CONFIG, AdapterDir,
                          check_run_config)
from .loading import resolve_model

__all__ = ["RUN_MARKER", "RUN_FILES", "EXPORT_MARKER", "check_output_dir", "check_writable", "input_at_risk",
           "output_lock", "write_export_marker", "versions", "abspath_or_none", "read_json",
           "resolve_adapter_dir", "open_adapter_dir", "run_config_for", "infer_task_kind", "HeadSpec",
           "base_for_adapter"]

RUN_MARKER = "elalora_run"
RUN_FILES = (RUN_CONFIG, METRICS, RANK_HISTORY, "adapter", "peft")


def is_run_dir(p: Path) -> bool:
    """Whether ``p`` is a run directory that ``elalora train`` wrote: its config.json carries the
    run marker (a Hugging Face model folder also has a config.json, and must never count)."""
    try:
        cfg = _read_json(p / RUN_CONFIG)
    except ValueError:
        return False
    return isinstance(cfg, dict) and cfg.get(RUN_MARKER) is True


EXPORT_MARKER = "elalora_export.json"
_ADAPTER_DIR_FILES = {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md", EXPORT_MARKER, HEAD_CONFIG}


def _is_replaceable_export(p: Path) -> bool:
    """What ``export --overwrite`` may replace: a folder an earlier ``elalora export`` wrote (it holds
    the export marker), or a bare adapter folder (adapter files and nothing else)."""
    if (p / EXPORT_MARKER).is_file() and not is_run_dir(p):
        return True
    names = {e.name for e in p.iterdir()}
    return ADAPTER_CONFIG in names and names <= _ADAPTER_DIR_FILES


def write_export_marker(tmp: Path, adir: Path, to: str, model_path: str | None) -> None:
    """The marker that makes an export folder replaceable by a later ``export --overwrite``."""
    write_json(tmp / EXPORT_MARKER, {"elalora_export": True, "to": to, "adapter": str(adir.resolve()),
                                     "model": model_path, "versions": versions()})


def input_at_risk(out: Path, inputs) -> tuple[str, str] | None:
    """The first input (flag, path) that replacing the directory ``out`` would delete."""
    o = out.expanduser().resolve()
    for flag, path in inputs:
        if not path:
            continue
        ip = Path(path).expanduser()
        if not ip.exists():
            continue
        ip = ip.resolve()
        if ip == o or o in ip.parents:
            return flag, str(path)
    return None


def check_writable(path: Path, flag: str) -> None:
    """Fail now, not after the work, if ``path`` cannot be created: probe the nearest existing
    folder on its way with a real temporary file (permission bits say nothing for root, nor for a
    read-only mount)."""
    probe = path.expanduser().absolute().parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if path.exists() and path.is_file() and not os.access(path, os.W_OK):
        raise RunError(f"cannot write {flag} {str(path)!r}: the file is read-only")
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".elalora-probe-"):
            pass
    except OSError as e:
        raise RunError(f"cannot write {flag} {str(path)!r}: {str(probe)!r} is not writable "
                       f"({e.strerror or e}); choose another location") from None


def check_output_dir(out: Path, overwrite: bool, *, what: str = "run", inputs=()) -> None:
    """Refuse an output directory that would destroy something: a file, an input of the job
    (the --model folder, the data, the adapter being exported), a non-empty folder elalora did
    not write, or (without --overwrite) an earlier result."""
    recover_interrupted_swap(out)  # an earlier save interrupted mid-swap: put its result back first
    if out.exists() and not out.is_dir():
        raise RunError(f"--output-dir {str(out)!r} is a file; choose a directory")
    hit = input_at_risk(out, inputs)
    if hit:
        raise RunError(f"--output-dir {str(out)!r} is or contains the input {hit[0]} {hit[1]!r}; writing there "
                       "would delete it. Choose another --output-dir")
    if out.is_dir() and any(out.iterdir()):
        if what == "run" and not is_run_dir(out):
            raise RunError(f"--output-dir {str(out)!r} is not empty and does not hold an elalora run; "
                           "choose a new or empty directory")
        if what == "export" and not _is_replaceable_export(out):
            why = "an elalora run" if is_run_dir(out) else "files elalora did not write"
            raise RunError(f"--output-dir {str(out)!r} holds {why}; --overwrite only replaces an earlier export. "
                           "Choose a new or empty directory")
        if not overwrite:
            held = "another run" if what == "run" else "an export"
            raise RunError(f"--output-dir {str(out)!r} already holds {held}; pass --overwrite to replace it "
                           "or choose another --output-dir")
    check_writable(out, "--output-dir")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("elalora", "torch", "transformers", "peft", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def abspath_or_none(p: str | None) -> str | None:
    return None if p is None else str(Path(p).expanduser().resolve())


def read_json(path: Path) -> dict:
    """A JSON object file of a run (:func:`elalora._io.read_json`; not an object: :class:`RunError`)."""
    obj = _read_json(path, error=RunError)
    if not isinstance(obj, dict):
        raise RunError(f"{str(path)!r} must hold a JSON object, got {type(obj).__name__}; the file is corrupt")
    return obj


def resolve_adapter_dir(path: str) -> Path:
    p = Path(path).expanduser()
    recover_interrupted_swap(p)  # a run or export whose final swap was interrupted: put it back
    if not p.exists():
        raise RunError(f"adapter directory {path!r} does not exist")
    if not p.is_dir():
        raise RunError(f"{path!r} is not a directory; pass an adapter directory (e.g. RUN_DIR/adapter)")
    if not (p / ADAPTER_CONFIG).is_file() and (p / "adapter" / ADAPTER_CONFIG).is_file():
        p = p / "adapter"
    if not (p / ADAPTER_CONFIG).is_file():
        raise RunError(f"{str(p)!r} holds no {ADAPTER_CONFIG}: not an adapter directory "
                       "(pass RUN_DIR/adapter or RUN_DIR/peft)")
    return p


def open_adapter_dir(path: str | Path) -> AdapterDir:
    """:func:`resolve_adapter_dir`, read and checked once (:class:`elalora.validation.AdapterDir`)."""
    return AdapterDir(resolve_adapter_dir(str(path)))


def run_config_for(adir: Path | AdapterDir) -> dict | None:
    """The config.json of the run an adapter belongs to (checked: :func:`elalora.validation.check_run_config`),
    or ``None`` when there is none; a Hugging Face config.json (no run marker) is no run's."""
    adir = Path(adir)
    for cand in (adir.parent / RUN_CONFIG, adir / RUN_CONFIG):
        if cand.is_file():
            try:
                cfg = _read_json(cand, error=RunError)
            except ElaLoRAError:
                continue
            if isinstance(cfg, dict) and cfg.get(RUN_MARKER):
                return check_run_config(cfg, str(cand))
    return None


def infer_task_kind(adir: Path | AdapterDir, fmt: str | None = None) -> tuple[str, int | None]:
    """Task kind and number of labels of an adapter without a run config (from its files)."""
    adir = adir if isinstance(adir, AdapterDir) else AdapterDir(adir)
    cfg = adir.config
    cls = (cfg.get("base_model") or {}).get("class") or ""
    task_type = cfg.get("task_type") or ""
    if cls.endswith("ForCausalLM") or task_type == "CAUSAL_LM":
        return "generation", None
    header = adir.header
    n_labels = None
    for k, v in header.items():
        name = k.replace("base_model.model.", "").replace(".modules_to_save.default", "")
        if name in ("classifier.weight", "score.weight", "classifier.out_proj.weight"):
            n_labels = int(v["shape"][0])
    if cls.endswith("ForImageClassification"):
        return "image", n_labels
    if n_labels is None:
        raise RunError(f"cannot tell the task of {str(adir.path)!r} (no run config.json next to it and no classifier "
                       "weights); pass --task")
    return ("regression" if n_labels == 1 else "classification"), n_labels


class HeadSpec:
    """A minimal task spec for building a head without loading data."""

    def __init__(self, kind: str, num_labels: int | None, label_names: list[str] | None):
        self.kind = kind
        self.num_labels = num_labels or 0
        self.label_names = label_names


def base_for_adapter(adir: Path | AdapterDir, args, run_cfg: dict | None, kind: str):
    model_arg = getattr(args, "model", None)
    gguf = getattr(args, "gguf_file", None)
    if model_arg is None and run_cfg is not None:
        model_arg, gguf = run_cfg.get("model"), gguf or run_cfg.get("gguf_file")
    if model_arg is None:
        cand = (adir if isinstance(adir, AdapterDir) else AdapterDir(adir)).base_model_name
        if isinstance(cand, str) and cand and Path(cand).exists():
            model_arg = cand
    return resolve_model(model_arg, gguf, kind)
