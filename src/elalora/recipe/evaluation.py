"""A finished run evaluated and analysed: its saved adapter on its base model with its evaluation data
(:func:`load_run_for_eval`, behind ``elalora eval``), and the layer-contribution study written into the
run directory (:func:`analyze_run`, behind ``elalora analyze`` and ``benchmarks/layer_contribution.py``).

Task, data, seed, max length and batch size default to the ones the run recorded in its config.json;
the base model to the run's (or the adapter's ``base_model_name_or_path``). The loading itself is
:func:`elalora.recipe.loading.load_model_for_task`, the same sequence as a training run's.

Imports: :mod:`.loading`, :mod:`.rundir`, :mod:`.trainer`, :mod:`.analysis`, :mod:`elalora.tasks`,
:mod:`elalora.persistence`, :mod:`elalora._io`, :mod:`elalora.errors`, :mod:`elalora.plots` (lazily).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .._io import atomic_write_bytes, json_default
from ..errors import RunError
from ..persistence import adapter_format
from ..tasks import get_task, load_task_data
from .analysis import DEFAULT_FRACTIONS, format_contribution_table, layer_contribution
from .exportdoc import run_config_of
from .loading import (load_adapted_model, load_model_for_task, merged_export_dir, quiet_transformers, recorded_pooling,
                      set_threads)
from .rundir import RUN_MARKER, base_for_adapter, check_writable, output_lock, read_json, resolve_adapter_dir
from .trainer import evaluate_model

__all__ = ["EvalRun", "load_run_for_eval", "AnalysisResult", "analyze_run", "final_ranks_of"]

_DATA_KEYS = ("data_dir", "train_file", "eval_file", "text_columns", "label_column", "max_eval_samples")


@dataclass
class EvalRun:
    """A saved adapter loaded onto its base model (in eval mode), with the data and settings that evaluate it."""

    adapter_dir: Path
    model_path: str
    model: Any
    task: Any  # the TaskSpec
    evals: list[dict]
    run_config: dict  # the run's config.json ({} when the adapter has none next to it)
    seed: int  # as resolved: given, else the run's (same task), else 42
    evaluate: Callable[[Any], dict[str, float]]  # model -> metrics, on ``evals``
    format: str = ""  # "elalora", "peft", or "merged" (a merged export: the model itself, no adapter)


def load_run_for_eval(adapter: str | Path, *, task: str | None = None, data_dir: str | None = None,
                      train_file: str | None = None, eval_file: str | None = None, text_columns: str | None = None,
                      label_column: str | None = None, max_eval_samples: int | None = None, seed: int | None = None,
                      model: str | None = None, gguf_file: str | None = None, max_length: int | None = None,
                      batch_size: int | None = None, max_new_tokens: int | None = None, threads: int | None = None,
                      check: Callable[[Path], None] | None = None) -> EvalRun:
    """Load the adapter ``adapter`` (an adapter directory, or a run directory meaning its adapter/) onto its
    base model with the evaluation data; arguments left ``None`` take the run's values (module docstring).
    ``check`` is called with the adapter directory once it is resolved, before the data and the model
    are loaded (``elalora eval --output`` checks its file there)."""
    quiet_transformers()
    merged = merged_export_dir(adapter)  # `export --to merged`: the model itself, no adapter to load
    adir = merged or resolve_adapter_dir(str(adapter))
    fmt = "merged" if merged else adapter_format(adir)
    run_cfg = run_config_of(adir) or {}  # an export's: the run it was exported from
    tr = run_cfg.get("training", {})
    if task is None:  # task and data default to the run's; explicit arguments win
        if not run_cfg.get("task"):
            raise RunError(f"pass --task: {str(adir)!r} has no run config.json next to it to take the task from")
        task = run_cfg["task"]
    same_task = run_cfg.get("task") == task
    data = dict(data_dir=data_dir, train_file=train_file, eval_file=eval_file, text_columns=text_columns,
                label_column=label_column, max_eval_samples=max_eval_samples)
    for key in _DATA_KEYS:
        if data[key] is None and same_task:
            data[key] = run_cfg.get(key)
    if seed is None:
        seed = tr.get("seed", 42) if same_task else 42
    run_max_length = tr.get("max_length") or 128
    batch_size = batch_size or tr.get("eval_batch_size") or 64
    max_new = max_new_tokens or tr.get("max_new_tokens") or 64
    if check is not None:
        check(adir)  # before the evaluation, not after it
    _, evals, spec = load_task_data(get_task(task), data["data_dir"], max_train_samples=None,
                                    max_eval_samples=data["max_eval_samples"], seed=seed,
                                    train_file=data["train_file"], eval_file=data["eval_file"],
                                    text_columns=data["text_columns"], label_column=data["label_column"])
    model_path, gguf = (str(merged), None) if merged else base_for_adapter(
        adir, SimpleNamespace(model=model, gguf_file=gguf_file), run_cfg, spec.kind)
    set_threads(threads)
    loaded = load_model_for_task(spec, model_path, gguf, seed=seed, max_length=max_length,
                                 default_max_length=run_max_length,
                                 pooling=recorded_pooling(adir, run_cfg))  # as trained (elalora_head.json)
    adapted = loaded.model if merged else load_adapted_model(adir, loaded.model)
    adapted.eval()

    def evaluate(m) -> dict[str, float]:
        return evaluate_model(m, spec, loaded.tokenizer, loaded.image_processor, evals, batch_size=batch_size,
                              max_length=loaded.max_length, max_new_tokens=max_new, seed=seed)

    return EvalRun(adir, model_path, adapted, spec, evals, run_cfg, seed, evaluate, fmt)


def final_ranks_of(run_dir: str | Path) -> dict[str, int]:
    """The final rank pattern recorded in a run's metrics.json (``analyze --ranks-from``)."""
    run_dir = Path(run_dir).expanduser()
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise RunError(f"--ranks-from {str(run_dir)!r}: no metrics.json there; give the --output-dir of a finished "
                       "'elalora train' run")
    pattern = read_json(path).get("rank_pattern")
    if not pattern:
        raise RunError(f"--ranks-from {str(run_dir)!r}: its metrics.json has no rank_pattern")
    return {str(k): int(v) for k, v in pattern.items()}


@dataclass
class AnalysisResult:
    """What :func:`analyze_run` wrote: the table, the JSON payload and the files."""

    table: str
    payload: dict
    written: list[Path] = field(default_factory=list)


def analyze_run(run_dir: str | Path, *, fractions: Sequence[float] = DEFAULT_FRACTIONS, random_draws: int = 3,
                seed: int | None = None, ranks_from: str | Path | None = None, figure: bool = True,
                progress: Callable[[str], None] | None = None, **load: Any) -> AnalysisResult:
    """The layer-contribution study of a run (:func:`elalora.recipe.analysis.layer_contribution`), written to
    ``run_dir/analysis/layer_contribution.{json,md}`` and ``run_dir/figures/layer_contribution.png``
    (``ranks_from``: the top/bottom sets chosen by another run's final ranks, written as
    ``layer_contribution_ranks_from.*``). ``load``: the keyword arguments of :func:`load_run_for_eval`
    (task, data, model, batch size, threads...); ``progress`` receives the progress lines."""
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / "config.json").is_file() or not read_json(run_dir / "config.json").get(RUN_MARKER):
        raise RunError(f"{str(run_dir)!r} is not an elalora run directory (no config.json with the {RUN_MARKER} "
                       "marker); give the --output-dir of an 'elalora train' run")
    fractions = tuple(fractions)
    out_dir = run_dir / "analysis"
    ranks, stem = None, "layer_contribution"
    if ranks_from is not None:
        ranks = final_ranks_of(ranks_from)
        stem = "layer_contribution_ranks_from"
    check_writable(out_dir / f"{stem}.json", "the run's analysis/ folder")
    run = load_run_for_eval(run_dir, seed=seed, **load)
    main_metric = run.task.metric_names[0]
    say = progress or (lambda msg: None)
    say(f"layer contribution of {run_dir} ({run.task.name}, {len(run.evals)} evaluation examples): "
        f"{1 + len(fractions) * (2 + random_draws)} evaluations of all {len(run.evals)} examples "
        f"({(1 + len(fractions) * (2 + random_draws)) * len(run.evals)} example forward passes; the first one "
        "times the rest, and each line after it says the time left)"
        + (f"; top/bottom chosen by the ranks of {ranks_from}" if ranks else ""))
    res = layer_contribution(run.model, run.evaluate, main_metric, fractions=fractions, random_draws=random_draws,
                             seed=run.seed, ranks=ranks, progress=say)
    table = format_contribution_table(res)
    payload = {"run_dir": str(run_dir.resolve()), "task": run.task.name, "n_eval": len(run.evals),
               "method": run.run_config.get("method"),
               "ranks_from": str(Path(ranks_from).expanduser().resolve()) if ranks else None, **res.to_dict()}
    with output_lock(out_dir):
        out_dir.mkdir(exist_ok=True)
        atomic_write_bytes(out_dir / f"{stem}.json", (json.dumps(payload, indent=2, default=json_default) + "\n").encode())
        atomic_write_bytes(out_dir / f"{stem}.md", (table + "\n").encode())
        written = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
        if figure:
            from ..plots import plot_layer_contribution

            fig = run_dir / "figures" / f"{stem}.png"
            plot_layer_contribution(res.summary(), fig, metric=main_metric, baseline=res.baseline[main_metric],
                                    title=f"Layer contribution: {run.task.name}, {run.run_config.get('method', '?')}"
                                    + (f" (sets by the ranks of {Path(ranks_from).name})" if ranks else ""))
            written.append(fig)
    return AnalysisResult(table, payload, written)
