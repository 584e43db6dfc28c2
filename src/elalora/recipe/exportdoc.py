"""What an export folder tells its reader: the head it needs (``elalora_head.json``, also for the formats
whose writer does not put it there: merged models, GGUF), a ``README.md`` with the exact calls that
reload it, and the warnings ``elalora export`` prints (serving engines that will not read it right,
and why a uniform export's total rank is larger than the run's).

The head description is :func:`elalora.heads.head_info`; the serving verdicts are
:func:`elalora.serving.serving_report`'s (judged once, there). A mean-pooling head needs one call on the
base model before the adapter is loaded, :data:`elalora.heads.RESTORE_CALL`: the README says so first.

Imports: :mod:`elalora.heads`, :mod:`elalora.persistence`, :mod:`elalora.serving`, :mod:`.rundir`.
"""

from __future__ import annotations

from pathlib import Path

from .._io import read_json, write_json
from ..heads import RESTORE_CALL, head_info
from ..persistence import ADAPTER_CONFIG, HEAD_CONFIG, AdapterDir, read_head_info
from ..serving import serving_report
from .rundir import EXPORT_MARKER, run_config_for

__all__ = ["README", "run_config_of", "peft_verdicts", "export_warnings", "export_readme", "write_export_docs",
           "write_run_docs"]

README = "README.md"

_AUTO_CLASS = {"classification": "AutoModelForSequenceClassification",
               "regression": "AutoModelForSequenceClassification",
               "generation": "AutoModelForCausalLM", "image": "AutoModelForImageClassification"}


def run_config_of(adir: Path) -> dict | None:
    """The config.json of the run an adapter belongs to: next to it, or, for a folder ``elalora export``
    wrote, next to the adapter it was exported from (its ``elalora_export.json`` names it)."""
    cfg = run_config_for(adir)
    if cfg is not None or not (adir / EXPORT_MARKER).is_file():
        return cfg
    try:
        src = read_json(adir / EXPORT_MARKER).get("adapter")
    except (ValueError, AttributeError):
        return None
    return run_config_for(Path(src)) if isinstance(src, str) and Path(src).is_dir() else None


def peft_verdicts(folder: Path) -> list:
    """:func:`elalora.serving.serving_report` of the PEFT LoRA export in ``folder`` (from its files)."""
    ad = AdapterDir(folder)  # read and checked once
    return serving_report(ad.config, {k: v["shape"] for k, v in ad.header.items()})


def export_warnings(folder: Path, layout: str, exported: dict[str, int], trained: dict[str, int]) -> list[str]:
    """One line per consumer of docs/serving.md that will not read the PEFT export in ``folder`` right, and,
    for the uniform layout, why its total rank is larger than the run's (``exported``: the rank per module
    in the file, ``trained``: the run's own ranks)."""
    lines = []
    total, own = sum(exported.values()), sum(trained.values())
    if layout == "uniform" and total != own:
        top = max(exported.values())
        lines.append(f"note: total rank {total} = {len(exported)} modules x rank {top}: the uniform layout pads every "
                     f"module with zero rows up to the largest rank ({top}) so that one global lora_alpha/r is "
                     f"right for every module; the update B·A is unchanged and the run's own ranks total {own} "
                     f"(the compact layout stores just those)")
    bad = [v for v in peft_verdicts(folder) if not v.ok]
    if layout == "compact":  # the layout for PEFT by design: one line, the reasons are inspect's
        if bad:
            lines.append(f"note: compact layout: {', '.join(v.consumer for v in bad)} will not read it right "
                         "('elalora inspect' on it says why; --layout uniform is the layout for serving engines)")
        return lines
    for v in bad:
        lines.append(f"warning: {v.consumer} will not read this export right: {v.reason}")
    if any(v.consumer != "peft" for v in bad):
        lines.append("(docs/serving.md. A classification head saved in full is for PEFT: the serving engines load "
                     "only the LoRA pairs, as for generative models)")
    return lines


def _load_lines(info: dict, to: str) -> list[str]:
    kind = info.get("task_type") or "classification"
    auto = _AUTO_CLASS.get(kind, "AutoModel")
    base = info.get("base_model") or "BASE_MODEL"
    kw = ""
    if kind == "regression":
        kw = ', num_labels=1, problem_type="regression"'
    elif kind in ("classification", "image") and info.get("num_labels"):
        kw = f", num_labels={info['num_labels']}"
    mean = info.get("pooling") == "mean"
    lines = [f"from transformers import {auto}"]
    if to == "peft":
        lines.append("from peft import PeftModel")
    if mean:
        lines.append("import elalora.heads  # pip install elalora: the head this adapter was trained with")
    lines.append("")
    if to == "merged":
        lines.append(f'model = {auto}.from_pretrained("path/to/this/folder")')
        if mean:
            lines.append(f"elalora.heads.use_mean_pooling(model)  # REQUIRED: {RESTORE_CALL}, see above")
    else:
        lines.append(f'base = {auto}.from_pretrained("{base}"{kw})')
        if mean:
            lines.append(f"{RESTORE_CALL}  # REQUIRED, before loading the adapter: see above")
        lines.append('model = PeftModel.from_pretrained(base, "path/to/this/folder")')
    lines.append("model.eval()")
    return lines


def export_readme(info: dict, to: str, *, layout: str | None = None, verdicts=None, source: str | None = None) -> str:
    """The README.md of an export folder: what it is, the head it needs, the exact reload calls."""
    kind, pooling = info.get("task_type"), info.get("pooling")
    what = {"peft": f"a PEFT LoRA adapter ({layout or 'compact'} layout)", "merged": "a full model with the "
            "adapter merged into its weights", "gguf": "a llama.cpp LoRA adapter (adapter.gguf)"}[to]
    out = [f"# {what[0].upper() + what[1:]}, exported by elalora", ""]
    if source:
        out += [f"Exported from `{source}`.", ""]
    out += ["| what | value |", "|---|---|", f"| base model | `{info.get('base_model')}` |",
            f"| task type | {kind} |", f"| labels | {info.get('num_labels')} |", f"| pooling | {pooling} |", ""]
    if pooling == "mean":
        out += ["**This model was trained with mean pooling.** Its classifier reads the masked mean of the last "
                "hidden states, not BERT's pooler over [CLS]. A plain transformers model does not do that by "
                f"itself: call `{RESTORE_CALL}` on the base model before loading the adapter, or the predictions "
                "are silently wrong. `elalora eval` and `elalora.load_adapter` do it for you (they read "
                f"`{HEAD_CONFIG}`).", ""]
    if to == "gguf":
        out += ["```bash", "llama-cli -m BASE.gguf --lora adapter.gguf -p \"...\"", "```", ""]
    else:
        out += ["Reload with transformers" + (" and peft" if to == "peft" else "") + ":", "", "```python",
                *_load_lines(info, to), "```", ""]
    if to != "merged":
        out += ["Evaluate with elalora (task, data and head from the run it came from):", "", "```bash",
                "elalora eval --adapter path/to/this/folder", "```", ""]
    if verdicts:
        out += ["Serving engines (docs/serving.md; `elalora inspect` says the same):", ""]
        out += [f"- {v.consumer}: {'reads it right' if v.ok else 'will NOT read it right'} ({v.reason})"
                for v in verdicts]
        out.append("")
    out.append(f"`{HEAD_CONFIG}` records the head (pooling, task type, labels, base model) for elalora.")
    return "\n".join(out) + "\n"


def write_export_docs(folder: Path, model, to: str, *, layout: str | None = None, source: str | None = None) -> dict:
    """Write ``elalora_head.json`` (unless the export wrote it) and ``README.md`` into the export ``folder``;
    returns the head description."""
    info = read_head_info(folder)
    if info is None:
        info = head_info(model)
        write_json(folder / HEAD_CONFIG, info)
    verdicts = peft_verdicts(folder) if to == "peft" else None
    (folder / README).write_text(export_readme(info, to, layout=layout, verdicts=verdicts, source=source))
    return info


def write_run_docs(run_dir: Path, model, layout: str) -> None:
    """A run's ``adapter/`` and ``peft/`` get the head they need (``elalora_head.json``; PEFT's own saves of the
    ``lora`` / ``gelora`` methods lack it) and ``peft/`` its README.md. ``model``: the base model as trained
    (with its pooling), not a PEFT wrapper."""
    adapter = Path(run_dir) / "adapter"
    if adapter.is_dir() and read_head_info(adapter) is None:
        write_json(adapter / HEAD_CONFIG, head_info(model))
    if (Path(run_dir) / "peft" / ADAPTER_CONFIG).is_file():
        write_export_docs(Path(run_dir) / "peft", model, "peft", layout=layout, source=str(adapter))
