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

Imports: the standard library, :mod:`elalora.persistence` (adapter file names and headers),
:mod:`.loading`, :mod:`elalora.errors`.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

from ..errors import RunError
from ..persistence import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_format, safetensors_header
from .loading import resolve_model

__all__ = ["RUN_MARKER", "RUN_FILES", "check_output_dir", "versions", "abspath_or_none", "read_json",
           "resolve_adapter_dir", "run_config_for", "infer_task_kind", "HeadSpec", "base_for_adapter"]

RUN_MARKER = "elalora_run"
RUN_FILES = ("config.json", "metrics.json", "rank_history.jsonl", "adapter", "peft")


def is_run_dir(p: Path) -> bool:
    return any((p / f).exists() for f in RUN_FILES)


def check_output_dir(out: Path, overwrite: bool, *, what: str = "run") -> None:
    if out.exists() and not out.is_dir():
        raise RunError(f"--output-dir {str(out)!r} is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()):
        if what == "run" and not is_run_dir(out):
            raise RunError(f"--output-dir {str(out)!r} is not empty and does not hold an elalora run; "
                           "choose a new or empty directory")
        if not overwrite:
            held = "another run" if what == "run" else "files"
            raise RunError(f"--output-dir {str(out)!r} already holds {held}; pass --overwrite to replace it "
                           "or choose another --output-dir")


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
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"cannot read {str(path)!r}: {' '.join(str(e).split())}") from None


def resolve_adapter_dir(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise RunError(f"adapter directory {path!r} does not exist")
    if not p.is_dir():
        raise RunError(f"{path!r} is not a directory; pass an adapter directory (e.g. RUN_DIR/adapter)")
    if not (p / ADAPTER_CONFIG).is_file() and (p / "adapter" / ADAPTER_CONFIG).is_file():
        p = p / "adapter"
    if not (p / ADAPTER_CONFIG).is_file():
        raise RunError(f"{str(p)!r} holds no adapter_config.json: not an adapter directory "
                       "(pass RUN_DIR/adapter or RUN_DIR/peft)")
    return p


def run_config_for(adir: Path) -> dict | None:
    for cand in (adir.parent / "config.json", adir / "config.json"):
        if cand.is_file():
            try:
                cfg = json.loads(cand.read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(cfg, dict) and cfg.get(RUN_MARKER):
                return cfg
    return None


def infer_task_kind(adir: Path, fmt: str) -> tuple[str, int | None]:
    """Task kind and number of labels of an adapter without a run config (from its files)."""
    cfg = read_json(adir / ADAPTER_CONFIG)
    cls = (cfg.get("base_model") or {}).get("class") or ""
    task_type = cfg.get("task_type") or ""
    if cls.endswith("ForCausalLM") or task_type == "CAUSAL_LM":
        return "generation", None
    header = safetensors_header(adir / ADAPTER_WEIGHTS)
    n_labels = None
    for k, v in header.items():
        name = k.replace("base_model.model.", "").replace(".modules_to_save.default", "")
        if name in ("classifier.weight", "score.weight", "classifier.out_proj.weight"):
            n_labels = int(v["shape"][0])
    if cls.endswith("ForImageClassification"):
        return "image", n_labels
    if n_labels is None:
        raise RunError(f"cannot tell the task of {str(adir)!r} (no run config.json next to it and no classifier "
                       "weights); pass --task")
    return ("regression" if n_labels == 1 else "classification"), n_labels


class HeadSpec:
    """A minimal task spec for building a head without loading data."""

    def __init__(self, kind: str, num_labels: int | None, label_names: list[str] | None):
        self.kind = kind
        self.num_labels = num_labels or 0
        self.label_names = label_names


def base_for_adapter(adir: Path, args, run_cfg: dict | None, kind: str):
    model_arg = getattr(args, "model", None)
    gguf = getattr(args, "gguf_file", None)
    if model_arg is None and run_cfg is not None:
        model_arg, gguf = run_cfg.get("model"), gguf or run_cfg.get("gguf_file")
    if model_arg is None:
        fmt = adapter_format(adir)
        cfg = read_json(adir / ADAPTER_CONFIG)
        cand = (cfg.get("base_model") or {}).get("name_or_path") if fmt == "elalora" else cfg.get("base_model_name_or_path")
        if cand and Path(cand).exists():
            model_arg = cand
    return resolve_model(model_arg, gguf, kind)
