"""A finished run evaluated and analysed: its saved adapter on its base model with its evaluation data
(:func:`load_run_for_eval`, behind ``elalora eval``), and the layer-contribution study written into the
run directory (:func:`analyze_run`, behind ``elalora analyze`` and ``benchmarks/layer_contribution.py``).

Task, data, seed, max length and batch size default to the ones the run recorded in its config.json
(the data as one :class:`~elalora.tasks.DataSpec`, :func:`eval_data`); the base model to the run's (or
the adapter's ``base_model_name_or_path``). The loading itself is
:func:`elalora.recipe.loading.load_for_task`, the same sequence as a training run's.

Imports: :mod:`.loading`, :mod:`.rundir`, :mod:`.trainer`, :mod:`.analysis`, :mod:`elalora.tasks`,
:mod:`elalora.validation` (every file read is checked there), :mod:`elalora._io`, :mod:`elalora.errors`,
:mod:`elalora.plots` (lazily).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .._io import atomic_write_bytes, write_json
from ..errors import RunError
from ..tasks import DataSpec, get_task
from ..validation import METRICS, RUN_CONFIG, read_run_dir
from .analysis import DEFAULT_FRACTIONS, format_contribution_table, layer_contribution
from .exportdoc import run_config_of
from .loading import load_adapted_model, load_for_task, merged_export_dir, quiet_transformers, recorded_pooling
from .rundir import RUN_MARKER, base_for_adapter, check_writable, open_adapter_dir, output_lock
from .trainer import evaluate_model

__all__ = ["EvalRun", "eval_data", "load_run_for_eval", "AnalysisResult", "analyze_run", "final_ranks_of"]


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


def eval_data(run_config: dict, data: Mapping[str, Any] | None = None, seed: int | None = None) -> DataSpec:
    """The :class:`~elalora.tasks.DataSpec` that evaluates a run: the fields of ``data`` given (not ``None``;
    :class:`~elalora.tasks.DataSpec`'s names but ``seed``) and ``seed`` win; the others are the run's
    (its ``config.json``: task, files, columns, sample limits, ``training.seed``) while the task is the
    run's, else the defaults (seed 42)."""
    given = {k: v for k, v in (data or {}).items() if v is not None}
    task = given.pop("task", None) or run_config.get("task")
    if run_config.get("task") == task:
        spec = DataSpec.from_fields(run_config, seed=run_config.get("training", {}).get("seed", 42))
    else:
        spec = DataSpec(task)
    return dataclasses.replace(spec, **given, **({} if seed is None else {"seed": seed}))


def load_run_for_eval(adapter: str | Path, *, data: Mapping[str, Any] | None = None, seed: int | None = None,
                      model: str | None = None, gguf_file: str | None = None, max_length: int | None = None,
                      batch_size: int | None = None, max_new_tokens: int | None = None, threads: int | None = None,
                      check: Callable[[Path], None] | None = None) -> EvalRun:
    """Load the adapter ``adapter`` (an adapter directory, or a run directory meaning its adapter/) onto its
    base model with the evaluation data (:func:`eval_data`: ``data`` holds the data fields given, e.g.
    ``{"task": "rte", "max_eval_samples": 100}``); arguments left ``None`` take the run's values (module
    docstring). ``check`` is called with the adapter directory once it is resolved, before the data and
    the model are loaded (``elalora eval --output`` checks its file there)."""
    quiet_transformers()
    merged = merged_export_dir(adapter)  # `export --to merged`: the model itself, no adapter to load
    ad = None if merged else open_adapter_dir(adapter)  # read and checked once; every step below takes it
    adir = merged or ad.path
    fmt = "merged" if merged else ad.format
    run_cfg = run_config_of(adir) or {}  # an export's: the run it was exported from
    tr = run_cfg.get("training", {})
    if (data or {}).get("task") is None and not run_cfg.get("task"):  # task and data default to the run's
        raise RunError(f"pass --task: {str(adir)!r} has no run config.json next to it to take the task from")
    spec = eval_data(run_cfg, data, seed)
    run_max_length = tr.get("max_length") or 128
    batch_size = batch_size or tr.get("eval_batch_size") or 64
    max_new = max_new_tokens or tr.get("max_new_tokens") or 64
    if check is not None:
        check(adir)  # before the evaluation, not after it
    # the base model before the data: a custom task's kind ("auto" until its data are read) picks no other model
    kind = get_task(spec.task).kind
    model_path, gguf = (str(merged), None) if merged else base_for_adapter(
        ad, SimpleNamespace(model=model, gguf_file=gguf_file), run_cfg, kind)
    loaded = load_for_task(spec, model_path, gguf_file=gguf, threads=threads, max_length=max_length,
                           default_max_length=run_max_length,
                           pooling=recorded_pooling(adir, run_cfg))  # as trained (elalora_head.json)
    adapted = loaded.model if merged else load_adapted_model(ad, loaded.model)
    adapted.eval()
    task, evals = loaded.task, loaded.evals

    def evaluate(m) -> dict[str, float]:
        return evaluate_model(m, task, loaded.tokenizer, loaded.image_processor, evals, batch_size=batch_size,
                              max_length=loaded.max_length, max_new_tokens=max_new, seed=spec.seed)

    return EvalRun(adir, model_path, adapted, task, evals, run_cfg, spec.seed, evaluate, fmt)


def final_ranks_of(run_dir: str | Path) -> dict[str, int]:
    """The final rank pattern recorded in a run's metrics.json (``analyze --ranks-from``)."""
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / METRICS).is_file():
        raise RunError(f"--ranks-from {str(run_dir)!r}: no {METRICS} there; give the --output-dir of a finished "
                       "'elalora train' run")
    pattern = (read_run_dir(run_dir).metrics or {}).get("rank_pattern")  # checked: integer ranks >= 0
    if not pattern:
        raise RunError(f"--ranks-from {str(run_dir)!r}: its {METRICS} has no rank_pattern")
    return dict(pattern)


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
    (``data``: task and data fields, model, batch size, threads...); ``progress`` receives the progress lines."""
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / RUN_CONFIG).is_file() or not (read_run_dir(run_dir).config or {}).get(RUN_MARKER):
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
        write_json(out_dir / f"{stem}.json", payload)
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
