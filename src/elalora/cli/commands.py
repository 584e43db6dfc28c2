"""The jobs behind the ``elalora`` subcommands: parsed arguments -> the recipe -> printed lines.

Parsing lives in :mod:`elalora.cli.main`; the work in :mod:`elalora.recipe` (training, loading,
the run directory), :mod:`elalora.persistence` (adapter summaries, exports) and :mod:`elalora.plots`.
Every user-facing error is an :class:`~elalora.errors.ElaLoRAError`, reported by ``main`` as one line.

Imports: :mod:`elalora.recipe`, :mod:`elalora.model`, :mod:`elalora.persistence`, :mod:`elalora.plots`,
:mod:`elalora.tasks`, :mod:`elalora.serving`, :mod:`elalora.export_gguf`, :mod:`elalora.validation` (every
file a command reads is read and checked there, as strictly as loading checks it), :mod:`elalora.errors`,
:mod:`elalora._io`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from .._io import atomic_directory, json_default, write_json
from ..errors import RunError
from ..export_gguf import export_gguf
from ..model import handle_of
from ..persistence import adapter_format, adapter_summary, read_head_info
from ..recipe import RunSpec, train
from ..recipe.evaluation import EvalRun, analyze_run, load_run_for_eval
from ..recipe.exportdoc import export_warnings, run_config_of, write_export_docs
from ..recipe.loading import (load_adapted_model, load_for_task, load_model_for_task, quiet_transformers,
                              recorded_pooling)
from ..recipe.methods import run_gelora_plan
from ..recipe.rundir import (EXPORT_MARKER, HeadSpec, base_for_adapter, check_output_dir, check_writable,
                             infer_task_kind, input_at_risk, open_adapter_dir, output_lock, write_export_marker)
from ..recipe.trainer import make_collator
from ..serving import ConsumerVerdict, format_serving_report, serving_report
from ..targets import select_target_modules
from ..tasks import DataSpec, get_task
from ..validation import GELORA_PLAN, METRICS, RANK_HISTORY, RUN_CONFIG, read_run_dir

__all__ = ["cmd_train", "cmd_eval", "cmd_analyze", "cmd_export", "cmd_plot", "cmd_inspect", "cmd_plan",
           "parse_target_modules"]


def parse_target_modules(text: str | None):
    """``--target-modules``: comma-separated names, or ``re:REGEX`` (a full-name regular expression)."""
    if text is None:
        return None
    text = text.strip()
    if text.startswith("re:"):
        return text[3:]
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise RunError("--target-modules is empty; give comma-separated module names or 're:REGEX'")
    return names


def parse_names(text: str | None) -> list[str] | None:
    """``--modules-to-save``: comma-separated module names (an empty list is refused by the recipe)."""
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]




def _check_output_file(output: str, *, inputs=(), adapter: Path | None = None) -> None:
    """``--output FILE`` of eval / plan, checked before the work: not a folder, not an input, writable."""
    outp = Path(output).expanduser()
    if outp.is_dir():
        raise RunError(f"--output {output!r} is a directory; give a file name")
    if adapter is not None and outp.exists() and (outp.resolve() == adapter.resolve()
                                                  or adapter.resolve() in outp.resolve().parents):
        raise RunError(f"--output {output!r} is a file of the adapter being evaluated; give another file name")
    if input_at_risk(outp, inputs):
        raise RunError(f"--output {output!r} is an input of this command; give another file name")
    check_writable(outp, "--output")


def cmd_train(args) -> int:
    targets = parse_target_modules(args.target_modules)
    spec = RunSpec.from_namespace(args)
    spec.target_modules = targets
    spec.modules_to_save = parse_names(args.modules_to_save)
    record = {"args": {k: v for k, v in vars(args).items() if k not in ("handler",)}}
    result = train(spec, args.output_dir, overwrite=args.overwrite, record=record)
    if result is None:  # a non-main process of a distributed launch
        return 0
    m = result.metrics
    final, pattern = m["final"], m["rank_pattern"]
    shown = ", ".join(f"{k} {v:.4f}" for k, v in final.items())
    print(f"done in {m['total_runtime_s']:.0f} s: {shown}")
    print(f"rank pattern: total {m['total_rank']} over {len(pattern)} matrices "
          f"(min {min(pattern.values())}, max {max(pattern.values())})")
    print(f"run directory: {result.run_dir}  (main metric {result.main_metric} = "
          f"{final.get(result.main_metric, float('nan')):.4f})")
    if m.get("learned_nothing"):  # ended at or below the constant answer (recipe.trainer.trivial_report)
        print(m["learned_nothing"])
    return 0


def _load_for_eval(args, adapter: str, *, output: str | None = None) -> EvalRun:
    """The adapter of ``eval`` / ``analyze`` on its base model (:func:`elalora.recipe.evaluation.load_run_for_eval`:
    task and data default to the run's); ``--output`` is checked before anything heavy is loaded."""
    def check(adir: Path) -> None:
        if output:
            _check_output_file(output, adapter=adir)

    return load_run_for_eval(adapter, **_eval_flags(args), seed=args.seed, check=check)  # --seed: the eval subset's


def _eval_flags(args) -> dict:
    """The flags of ``eval`` / ``analyze`` that :func:`~elalora.recipe.evaluation.load_run_for_eval` takes; the
    data flags as its ``data`` (:class:`~elalora.tasks.DataSpec`'s fields given, the seed apart)."""
    data = {f.name: getattr(args, f.name) for f in dataclasses.fields(DataSpec)
            if f.name != "seed" and hasattr(args, f.name)}
    return dict(data=data, model=args.model, gguf_file=args.gguf_file, max_length=args.max_length,
                batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, threads=args.threads)


def cmd_eval(args) -> int:
    ld = _load_for_eval(args, args.adapter, output=args.output)
    metrics = ld.evaluate(ld.model)
    for k, v in metrics.items():
        print(f"{k}: {v:.6f}")
    if args.output:
        write_json(Path(args.output).expanduser(),
                           {"task": ld.task.name, "adapter": str(ld.adapter_dir.resolve()),
                            "format": ld.format or adapter_format(ld.adapter_dir), "model": ld.model_path,
                            "n_eval": len(ld.evals),
                            "metrics": metrics})
    return 0


def cmd_analyze(args) -> int:
    """Layer-contribution study of a run (:func:`elalora.recipe.evaluation.analyze_run`): table + JSON + figure
    in the run."""
    res = analyze_run(args.run_dir, fractions=args.fractions, random_draws=args.random_draws, seed=args.seed,
                      ranks_from=args.ranks_from, figure=not args.no_figure,
                      progress=lambda msg: print(msg, flush=True), **_eval_flags(args))
    print()
    print(res.table)
    print()
    for p in res.written:
        print(f"wrote {p}")
    return 0


def cmd_export(args) -> int:
    quiet_transformers()
    ad = open_adapter_dir(args.adapter)  # read and checked once
    adir = ad.path
    out = Path(args.output_dir).expanduser()
    if out.resolve() == adir.resolve() or adir.resolve() in out.resolve().parents:
        raise RunError("--output-dir must not be the adapter directory or inside it")
    inputs = [("--adapter", str(adir)), ("--model", getattr(args, "model", None))]
    check_output_dir(out, args.overwrite, what="export", inputs=inputs)
    with output_lock(out):
        check_output_dir(out, args.overwrite, what="export", inputs=inputs)  # again, under the lock
        return _export(args, ad, out)


def _export(args, ad, out: Path) -> int:
    adir, fmt = ad.path, ad.format
    layout = _export_layout(args, adir, fmt)
    if args.to == "peft" and fmt == "peft":
        with atomic_directory(out) as tmp:
            for f in adir.iterdir():
                if f.is_file() and f.name != EXPORT_MARKER:
                    shutil.copy2(f, tmp / f.name)
            write_export_marker(tmp, adir, "peft", None)
        print(f"{adir} is already a PEFT LoRA adapter; copied to {out}")
        return 0
    run_cfg = run_config_of(adir)  # an export's: the run it was exported from
    if run_cfg is not None:
        ts = run_cfg.get("task_spec", {})
        spec = HeadSpec(ts.get("kind", "classification"), ts.get("num_labels"), ts.get("label_names"))
    else:
        kind, n = infer_task_kind(ad)
        spec = HeadSpec(kind, n, None)
    pooling = recorded_pooling(adir, run_cfg)  # as trained; the export records it (elalora_head.json, README.md)
    model_path, gguf_file = base_for_adapter(ad, args, run_cfg, spec.kind)
    seed = (run_cfg or {}).get("training", {}).get("seed", 0)
    loaded = load_model_for_task(spec, model_path, gguf_file, seed=seed, pooling=pooling)
    tokenizer, image_processor = loaded.tokenizer, loaded.image_processor
    model = load_adapted_model(ad, loaded.model)
    notes: list[str] = []
    with atomic_directory(out) as tmp:
        write_export_marker(tmp, adir, args.to, model_path)
        if args.to == "peft":
            pattern = handle_of(model).export_peft(str(tmp), base_model_name_or_path=model_path, layout=layout)
            msg = (f"PEFT LoRA adapter ({layout} layout) with {len(pattern)} modules, "
                   f"total rank {sum(pattern.values())}")
            notes = export_warnings(tmp, layout, pattern, handle_of(model).rank_pattern())
        elif args.to == "gguf":
            info = export_gguf(handle_of(model), tmp / "adapter.gguf")  # ExportError / MissingExtraError: one line
            msg = (f"llama.cpp LoRA adapter adapter.gguf ({info['architecture']}, {len(info['tensors']) // 2} "
                   f"modules at rank {info['rank']}, alpha {info['alpha']:g})")
        else:
            if fmt == "elalora":
                    merged = handle_of(model).merge_and_unload()
            else:
                merged = model.merge_and_unload()
            merged.save_pretrained(str(tmp))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            if image_processor is not None:
                image_processor.save_pretrained(str(tmp))
            msg = f"merged {type(merged).__name__} (loads with transformers' from_pretrained)"
            model = merged
        head = write_export_docs(tmp, model, args.to, layout=layout if args.to == "peft" else None, source=str(adir))
    print(f"wrote {msg} to {out}")
    if head.get("restore"):
        print(f"note: trained with {head['pooling']} pooling: after a plain transformers from_pretrained of the base, "
              f"call {head['restore']} (see {out}/README.md; elalora eval and load_adapter do it themselves)")
    for line in notes:
        print(line)
    return 0


def _export_layout(args, adir: Path, fmt: str) -> str:
    """The PEFT layout ``export`` writes (``compact`` unless ``--layout uniform``); refuses what does not combine."""
    layout = getattr(args, "layout", None)
    if args.to == "gguf" and layout == "compact":
        raise RunError("--to gguf is always written in the uniform layout (llama.cpp scales each tensor by "
                       "alpha / its own rank); drop --layout compact")
    if args.to == "merged" and layout:
        raise RunError("--layout applies to --to peft only")
    if fmt == "peft" and (args.to == "gguf" or layout == "uniform"):
        raise RunError(f"{adir} is a PEFT LoRA adapter; --to gguf and --layout uniform convert elalora adapters "
                       "(a run's adapter/). For a PEFT adapter use llama.cpp's convert_lora_to_gguf.py")
    return layout or "compact"


def cmd_plot(args) -> int:
    run_dir = Path(args.run_dir).expanduser()
    if not run_dir.is_dir():
        raise RunError(f"run directory {args.run_dir!r} does not exist")
    names = (RUN_CONFIG, METRICS, RANK_HISTORY, GELORA_PLAN)
    if not any((run_dir / f).is_file() for f in names):
        raise RunError(f"{str(run_dir)!r} holds none of {', '.join(names)}: not an elalora run directory")
    run = read_run_dir(run_dir)  # every file checked (ranks >= 0 and within the adapter's capacities)
    cfg, met, events, plan = run.config or {}, run.metrics or {}, run.events, run.plan
    initial = met.get("initial_rank_pattern") or (plan or {}).get("rank_pattern") or {}
    final = met.get("rank_pattern") or {}
    if not initial and not final and not events and not plan and run.adapter is not None:
        final = adapter_summary(run.adapter)["rank_pattern"]
    written = figures_strict(run_dir, initial, final, events, met.get("importance_scores"), plan,
                             cfg.get("total_steps") or met.get("steps"))
    for p in written:
        print(p)
    return 0


def figures_strict(run_dir, initial, final, events, scores, plan, total_steps) -> list[str]:
    from .. import plots

    try:
        return plots.write_all_figures(run_dir, initial=initial, final=final, events=events, scores=scores,
                                       ids=(plan or {}).get("intrinsic_dims"),
                                       block_ranks=(plan or {}).get("block_ranks"), total_steps=total_steps)
    except (ValueError, KeyError, TypeError) as e:
        raise RunError(f"cannot draw the figures of {str(run_dir)!r}: {' '.join(str(e).split())[:300]}") from None


def cmd_inspect(args) -> int:
    from ..plots import format_rank_table

    ad = open_adapter_dir(args.adapter)  # read and checked as strictly as loading checks it
    adir = ad.path
    s = adapter_summary(ad)
    if s["format"] == "peft":  # which serving engines read this export right (elalora.serving)
        shapes = {k: v["shape"] for k, v in ad.header.items()}
        s["consumers"] = [v.to_dict() for v in serving_report(ad.config, shapes)]
    s["head"] = read_head_info(adir)  # pooling, task type, labels (elalora_head.json; None for older saves)
    if args.json:
        print(json.dumps(s, indent=2, default=json_default))
        return 0
    base = (s.get("base_model") or {}).get("name_or_path")
    head = f"{adir}: {s['format']} adapter"
    if s["format"] == "elalora":
        head += f", method {s['method']}, {s.get('step_count')} steps, {s.get('events')} rank changes"
    print(head)
    if base:
        print(f"base model: {base}")
    if s["head"]:
        h = s["head"]
        print(f"head: {h.get('task_type')}, {h.get('num_labels')} label(s), {h.get('pooling')} pooling"
              + (f"; a plain transformers base needs {h['restore']} before loading it" if h.get("restore") else ""))
    print()
    print(format_rank_table(s["rank_pattern"], capacity=s.get("capacity"), params=s["module_params"]))
    adapter_params = sum(s["module_params"].values())
    print(f"modules saved in full ({', '.join(s.get('modules_to_save') or []) or 'none'}): {s['full_params']:,} "
          f"parameters; adapter + saved modules: {adapter_params + s['full_params']:,} parameters")
    if s.get("consumers"):
        print("\nLoRA consumers (each one's scale rule against PEFT's update):")
        print(format_serving_report([ConsumerVerdict(**v) for v in s["consumers"]]))
    return 0


def cmd_plan(args) -> int:
    quiet_transformers()
    get_task(args.task)  # unknown task: TaskError before anything else
    targets = parse_target_modules(args.target_modules)
    if args.output:
        _check_output_file(args.output, inputs=[("--model", args.model), ("--data-dir", args.data_dir),
                                                ("--train-file", args.train_file), ("--eval-file", args.eval_file)])
    loaded = load_for_task(DataSpec.from_fields(args), args.model, gguf_file=args.gguf_file, threads=args.threads,
                           max_length=args.max_length)
    spec, train, model, model_path, gguf_file = (loaded.task, loaded.train, loaded.model, loaded.model_path,
                                                 loaded.gguf_file)
    collate = make_collator(spec, loaded.tokenizer, loaded.image_processor, loaded.max_length)
    names, targets = select_target_modules(model, targets, loaded.head)
    plan = run_gelora_plan(model, train, collate, names, r=args.r, samples=args.gelora_samples,
                           pooling=args.gelora_pooling, batch_size=args.batch_size, seed=args.seed,
                           alpha_scale=args.gelora_alpha_scale)
    from ..plots import format_rank_table

    print(f"GeLoRA plan for {spec.name} on {model_path}{'/' + gguf_file if gguf_file else ''}: "
          f"{plan.n_samples} examples, pooling {plan.pooling}, "
          + (f"rescaled to average rank {args.r} (total {plan.target_total})" if args.r
             else "unbudgeted (paper's rule)"))
    print()
    print("hidden state  intrinsic dim   block  rank (rule)")
    ids = plan.intrinsic_dims
    for j, d in enumerate(ids):
        blk = f"{j - 1:>5}  {plan.block_ranks[j - 1]:>4}" if j >= 1 else "    -     -"
        print(f"H_{j:<10} {d:>14.2f}   {blk}")
    print()
    print(format_rank_table(plan.rank_pattern))
    if args.output:
        outp = Path(args.output).expanduser()
        write_json(outp, {"task": spec.name, "model": model_path, "gguf_file": gguf_file, **plan.to_dict()})
        print(f"\nwrote {outp}")
    return 0
