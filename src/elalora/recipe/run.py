"""The phases of a training run: :func:`prepare` (data, base model, target modules, every early check)
-> :func:`build` (GeLoRA plan, adapters) -> :func:`fit` (the Hugging Face Trainer) -> :func:`save_run`
(the run directory), and :func:`train`, all of them into an output directory atomically. The package
:mod:`elalora.recipe` re-exports the public names.

Imports: :mod:`elalora.model`, :mod:`elalora.persistence`, :mod:`elalora.tasks`, :mod:`elalora.plots`,
:mod:`elalora.integrations` (the ALoRA progress bar), :mod:`elalora.targets`, :mod:`elalora.errors`,
:mod:`elalora._io`, transformers, peft.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_directory, json_default, write_json
from ..errors import RunError, TrainingDivergedError, diverged_message
from ..layers import adapter_form
from ..model import get_model
from ..persistence import EXPORT_LAYOUTS, peft_task_type
from ..targets import select_target_modules
from ..tasks import TaskSpec, get_task
from .exportdoc import write_run_docs
from .loading import load_for_task, quiet_transformers
from .methods import (build_method_config, expected_total_steps, peft_rank_pattern, run_gelora_plan, schedule_dict,
                      with_targets)
from .spec import DEFAULT_LR, PEFT_METHODS, RunSpec, inapplicable_knobs
from .rundir import RUN_MARKER, abspath_or_none, check_output_dir, output_lock, versions
from .trainer import (TaskTrainer, distributed_launch, example_lengths, generation_evaluator, is_main_process,
                      make_collator, prediction_metrics, training_args, trivial_report, world_size)

__all__ = ["RunSpec", "Prepared", "Built", "Fitted", "RunResult", "prepare", "build", "fit", "save_run", "train",
           "default_output_dir", "log", "write_figures"]


def log(msg: str) -> None:
    if is_main_process():  # one copy of each progress line under DDP
        print(msg, file=sys.stderr, flush=True)


def default_output_dir(spec: RunSpec) -> Path:
    return Path(f"runs/{get_task(spec.task).name}-{spec.method}-r{spec.r}")


# ------------------------------------------------------------------------------------ phase 1: prepare
@dataclass
class Prepared:
    """Data, base model and target modules of a run, checked before anything trains."""

    spec: RunSpec
    task: TaskSpec
    train: list[dict]
    evals: list[dict]
    val_examples: list[dict] | None
    total_steps: int
    model_path: str
    gguf_file: str | None
    max_length: int
    tokenizer: Any
    model: Any
    image_processor: Any
    collate: Any
    head: list[str] | None
    module_names: list[str]
    targets: Any
    config: Any = None  # the method config (None for the PEFT-trained methods), built once in _check_flags


def _check_flags(spec: RunSpec):
    """Options that do not combine, and the method knobs, before anything heavy is loaded. Returns the
    method config (built here, once per run; ``None`` for the PEFT-trained methods)."""
    bad = inapplicable_knobs(spec)
    if bad:
        knob, methods = bad[0]
        why = " (its alphas come from the plan: set the scale alpha/r with --gelora-alpha-scale)" \
            if knob == "lora_alpha" and spec.method == "gelora" else ""
        raise RunError(f"--{knob.replace('_', '-')} does not apply to --method {spec.method}{why}; it applies to "
                       f"--method {', '.join(methods)}")
    if spec.export_layout not in EXPORT_LAYOUTS:
        raise RunError(f"--export-layout {spec.export_layout!r}: choose one of {', '.join(EXPORT_LAYOUTS)}")
    if spec.export_layout != "compact" and spec.method in PEFT_METHODS:
        raise RunError(f"--export-layout {spec.export_layout} applies to the adaptive methods; --method "
                       f"{spec.method} trains PEFT's own LoRA, whose peft/ is PEFT's save as it is")
    if spec.method in PEFT_METHODS:
        return None
    return build_method_config(spec, spec.target_modules, None)  # ConfigError on bad knobs


def _hold_out_alora_batch(config, spec: RunSpec, train: list[dict]) -> tuple[list[dict], list[dict] | None]:
    """ALoRA's ablation batch B_val: held out from the training set when it is large enough."""
    if spec.method != "alora":
        return train, None
    n_train, size = len(train), config.val_batch_size
    picked = random.Random(spec.seed).sample(range(n_train), min(size, n_train))
    val_examples = [train[i] for i in picked]
    if n_train >= 4 * size:  # else too little data to hold out: B_val overlaps training
        held = set(picked)
        train = [ex for i, ex in enumerate(train) if i not in held]
    return train, val_examples


def prepare(spec: RunSpec) -> Prepared:
    """Load the data and the base model, pick the target modules; every check that can fail early."""
    config = _check_flags(spec)
    if spec.lr is None:  # the evidence's lr for the method's adapter form (recipe.spec.DEFAULT_LR)
        spec = dataclasses.replace(spec, lr=DEFAULT_LR[config.form if config is not None else "lora"])
    train = val_examples = total_steps = None

    def fits(data_train: list[dict], evals: list[dict], task: TaskSpec) -> None:
        """Once the data are loaded, before the model: ALoRA's held-out batch, the run's length, the schedule."""
        nonlocal train, val_examples, total_steps
        train, val_examples = _hold_out_alora_batch(config, spec, data_train)
        # under DDP one optimizer step consumes batch_size × world_size examples
        total_steps = expected_total_steps(len(train), spec.batch_size * world_size(), spec.grad_accum, spec.epochs,
                                           spec.max_steps)
        if config is not None:
            schedule_dict(config, total_steps)  # ConfigError if tinit + tfinal >= T etc.

    loaded = load_for_task(spec.data, spec.model, gguf_file=spec.gguf_file, threads=spec.threads,
                           bits=spec.load_in_bits, bf16=spec.bf16, max_length=spec.max_length, pooling=spec.pooling,
                           modules_to_save=spec.modules_to_save, check=fits)
    task, evals, model_path, gguf_file = loaded.task, loaded.evals, loaded.model_path, loaded.gguf_file
    tokenizer, model, image_processor, max_length, head = (loaded.tokenizer, loaded.model, loaded.image_processor,
                                                            loaded.max_length, loaded.head)
    spec = dataclasses.replace(spec, pooling=loaded.pooling)  # "auto" made concrete, as config.json records it
    collate = make_collator(task, tokenizer, image_processor, max_length)
    module_names, targets = select_target_modules(model, spec.target_modules, head)
    if config is not None and hasattr(config, "check_pool"):
        config.check_pool(len(module_names))  # ElaLoRA: b too large for k and the number of matrices
    log(f"elalora train: task {task.name} ({len(train)} train / {len(evals)} eval examples), method {spec.method}, "
        f"r={spec.r}, {len(module_names)} adapted matrices of {model_path}{'/' + gguf_file if gguf_file else ''}, "
        f"{total_steps} optimizer steps, {torch.get_num_threads()} CPU thread(s)")
    if task.kind in ("classification", "regression"):  # the only tasks whose head pools (resolve_pooling)
        log(f"pooling: {loaded.pooling} ({loaded.pooling_reason})")
    return Prepared(spec, task, train, evals, val_examples, total_steps, model_path, gguf_file, max_length, tokenizer,
                    model, image_processor, collate, head, module_names, targets, config)


# -------------------------------------------------------------------------------------- phase 2: build
@dataclass
class Built:
    """The model to train: a PEFT LoRA model (``lora``, ``gelora``) or the base with an elalora handle."""

    plan: Any
    handle: Any
    peft_model: Any
    train_model: Any
    method_config: dict
    initial_pattern: dict[str, int]

    @classmethod
    def from_peft_model(cls, peft_model: Any, method_config: dict) -> Built:
        """A PEFT model built outside :func:`build` (an adapter the recipe has no method for, e.g. PEFT
        AdaLoRA as a baseline), ready for :func:`fit`: trained as it is, with no plan and no elalora handle."""
        return cls(plan=None, handle=None, peft_model=peft_model, train_model=peft_model,
                   method_config=dict(method_config), initial_pattern={})


def _copy(names: list[str] | None) -> list[str] | None:
    """A copy for PEFT, whose sequence-classification model appends its default heads to the list in place."""
    return None if names is None else list(names)


def _peft_lora(prep: Prepared, plan) -> tuple[Any, dict]:
    from peft import LoraConfig, get_peft_model

    spec = prep.spec
    common = dict(r=spec.r, target_modules=list(prep.module_names), lora_dropout=spec.lora_dropout, bias="none",
                  modules_to_save=_copy(prep.head), task_type=peft_task_type(prep.model))
    if plan is None:
        # the LoRA form's default alpha (2r): --method lora and ElaLoRA's LoRA form share one scale rule
        alpha = spec.lora_alpha if spec.lora_alpha is not None else adapter_form("lora").default_alpha(spec.r)
        lcfg = LoraConfig(lora_alpha=alpha, **common)
    else:
        lcfg = LoraConfig(lora_alpha=plan.alpha_scale * spec.r, rank_pattern=dict(plan.rank_pattern),
                          alpha_pattern=dict(plan.alpha_pattern), **common)
    torch.manual_seed(spec.seed)
    peft_model = get_peft_model(prep.model, lcfg)
    return peft_model, {"method": spec.method, **json.loads(json.dumps(lcfg.to_dict(), default=json_default))}


def build(prep: Prepared, run_dir: Path | None = None) -> Built:
    """The GeLoRA plan (GeLoRA methods; written to ``run_dir/gelora_plan.json``) and the adapters."""
    spec = prep.spec
    plan = None
    if spec.method in ("gelora", "gelora-elalora"):
        t0 = time.time()
        plan = run_gelora_plan(prep.model, prep.train, prep.collate, prep.module_names, r=spec.r,
                               samples=spec.gelora_samples, pooling=spec.gelora_pooling, batch_size=spec.batch_size,
                               seed=spec.seed, alpha_scale=spec.gelora_alpha_scale)
        log(f"GeLoRA plan ({time.time() - t0:.1f} s): intrinsic dimensions "
            + " ".join(f"{d:.1f}" for d in plan.intrinsic_dims) + "; block ranks "
            + " ".join(str(r) for r in plan.block_ranks))
        if run_dir is not None:
            write_json(run_dir / "gelora_plan.json", plan.to_dict())
    if spec.method in PEFT_METHODS:
        peft_model, method_config = _peft_lora(prep, plan if spec.method == "gelora" else None)
        return Built(plan, None, peft_model, peft_model, method_config, peft_rank_pattern(peft_model))
    config = with_targets(prep.config, prep.targets, prep.head, plan)
    handle = get_model(prep.model, config)
    if spec.method == "alora":
        handle.allocator.set_validation_batch(prep.collate(prep.val_examples))
        _alora_progress(handle.allocator, prep.total_steps, spec.batch_size * spec.grad_accum)
    return Built(plan, handle, None, prep.model, config.to_dict(), dict(handle.initial_rank_pattern))


def _alora_progress(allocator, total_steps: int, step_examples: int) -> None:
    """Log the expected cost of the ALoRA schedule; show each round's progress bar and duration."""
    from ..integrations.progress import RoundProgress, describe_cost

    allocator.set_total_steps(int(total_steps))  # the Trainer callback sets the same values again
    allocator.set_step_examples(int(step_examples))
    log(describe_cost(allocator.expected_cost())
        + f"; rounds after steps {[t + 1 for t in allocator.planned_rounds()]}")
    allocator.progress = RoundProgress(log=log, disable=not is_main_process())


# ---------------------------------------------------------------------------------------- phase 3: fit
@dataclass
class Fitted:
    """What training produced: the trainer, its output, the evaluation and loss histories, the final metrics."""

    trainer: Any
    train_out: Any
    train_runtime: float
    history: list[dict]
    losses: list[dict]
    final: dict[str, float]
    eval_batch_size: int
    logging_steps: int
    grouped: bool


def _histories(trainer, task: TaskSpec) -> tuple[list[dict], list[dict], dict[str, float]]:
    """Per-evaluation history, train-loss history and final metrics; the final evaluation reuses the
    last one if it was at the end."""
    history, losses = [], []
    steps_done = int(trainer.state.global_step)
    for rec in trainer.state.log_history:
        if "loss" in rec and "step" in rec:
            losses.append({"step": rec["step"], "epoch": rec.get("epoch"), "loss": rec["loss"],
                           "learning_rate": rec.get("learning_rate"), "grad_norm": rec.get("grad_norm")})
        if any(f"eval_{m}" in rec for m in task.metric_names):
            entry = {"step": rec.get("step"), "epoch": rec.get("epoch")}
            entry.update({m: rec[f"eval_{m}"] for m in task.metric_names if f"eval_{m}" in rec})
            if "eval_loss" in rec:
                entry["eval_loss"] = rec["eval_loss"]
            history.append(entry)
    if history and history[-1]["step"] == steps_done:
        return history, losses, {m: history[-1][m] for m in task.metric_names if m in history[-1]}
    out = trainer.evaluate()
    final = {m: float(out[f"eval_{m}"]) for m in task.metric_names if f"eval_{m}" in out}
    entry = {"step": steps_done, "epoch": trainer.state.epoch, **final}
    if "eval_loss" in out:
        entry["eval_loss"] = out["eval_loss"]
    history.append(entry)
    return history, losses, final


def fit(prep: Prepared, built: Built, trainer_dir: str, *, callbacks: Sequence[Any] | None = None) -> Fitted:
    """Train with the Hugging Face Trainer (the elalora callback drives the handle) and evaluate.

    ``callbacks``: more ``transformers.TrainerCallback`` objects, added after the run's own (the elalora
    callback, or the divergence check of a PEFT-trained model), e.g. PEFT AdaLoRA's ``update_and_allocate``
    from ``on_optimizer_step`` (benchmarks/accuracy.py)."""
    spec, task = prep.spec, prep.task
    lengths = None
    if spec.group_by_length and task.kind != "image":
        lengths = example_lengths(task, prep.tokenizer, prep.train, prep.max_length)
    eval_bs = spec.eval_batch_size or 2 * spec.batch_size
    logging_steps = spec.logging_steps or max(1, min(10, prep.total_steps // 5))
    targs = training_args(trainer_dir, batch_size=spec.batch_size, eval_batch_size=eval_bs, lr=spec.lr,
                          epochs=spec.epochs, max_steps=spec.max_steps, grad_accum=spec.grad_accum,
                          warmup_ratio=spec.warmup_ratio, weight_decay=spec.weight_decay, seed=spec.seed,
                          eval_steps=spec.eval_steps, logging_steps=logging_steps, bf16=spec.bf16)
    gen_eval = None
    if task.kind == "generation":
        gen_eval = generation_evaluator(task, prep.tokenizer, prep.evals, batch_size=eval_bs,
                                        max_length=prep.max_length, max_new_tokens=spec.max_new_tokens)
    trainer = TaskTrainer(model=built.train_model, args=targs, train_dataset=prep.train, eval_dataset=prep.evals,
                          data_collator=prep.collate, compute_metrics=None if gen_eval else prediction_metrics(task),
                          lengths=lengths, generation_eval=gen_eval)
    if built.handle is not None:
        # under DDP also all-gather a digest of the rank pattern after every round (fails loudly on drift)
        built.handle.callback(check_consistency=distributed_launch()).attach(trainer)
    else:
        from ..integrations.trainer import DivergenceCallback

        trainer.add_callback(DivergenceCallback())  # the elalora callback does this check itself
    for cb in callbacks or ():
        trainer.add_callback(cb)
    t_train = time.time()
    train_out = trainer.train()
    train_runtime = time.time() - t_train
    history, losses, final = _histories(trainer, task)
    return Fitted(trainer, train_out, train_runtime, history, losses, final, eval_bs, logging_steps,
                  lengths is not None)


# ----------------------------------------------------------------------------------- phase 4: save
@dataclass
class RunResult:
    """A finished run: its directory and the contents of ``metrics.json``."""

    run_dir: Path
    metrics: dict

    @property
    def main_metric(self) -> str:
        return self.metrics["main_metric"]


def _save_adapters(built: Built, run_dir: Path, model_path: str, layout: str = "compact"
                   ) -> tuple[dict, dict, list, dict | None]:
    """Write adapter/ and peft/ (in ``layout``); returns (final rank pattern, parameter counts, events,
    final scores)."""
    handle = built.handle
    if handle is None:
        pm = built.peft_model
        pm.save_pretrained(str(run_dir / "adapter"))
        pm.save_pretrained(str(run_dir / "peft"))
        trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
        counts = {"total": sum(p.numel() for p in pm.parameters()), "trainable": trainable, "active": trainable}
        return peft_rank_pattern(pm), counts, [], None
    handle.save_pretrained(str(run_dir / "adapter"))
    handle.export_peft(str(run_dir / "peft"), base_model_name_or_path=model_path, layout=layout)
    scores = None
    if handle.importance is not None:
        sc = handle.importance.rank_scores()
        scores = {n: [float(v) for v in s[a.active.cpu()].tolist()]
                  for n, s, a in zip(handle.names, sc, handle.adapters)}
    return handle.rank_pattern(), handle.parameter_counts(), [e.to_dict() for e in handle.events], scores


def _metrics(prep: Prepared, built: Built, fitted: Fitted, final_pattern, counts, events, scores, t_start) -> dict:
    state, task = fitted.trainer.state, prep.task
    train_loss = fitted.train_out.training_loss
    metrics = {
        "task": task.name, "method": prep.spec.method, "main_metric": task.main_metric,
        "metric_names": list(task.metric_names), "final": fitted.final, "history": fitted.history,
        "train_loss": fitted.losses, "train_loss_mean": float(train_loss) if train_loss is not None else None,
        "steps": int(state.global_step), "epochs": state.epoch,
        "train_runtime_s": round(fitted.train_runtime, 2), "total_runtime_s": round(time.time() - t_start, 2),
        "parameters": counts, "total_rank": int(sum(final_pattern.values())), "rank_pattern": final_pattern,
        "initial_rank_pattern": built.initial_pattern, "rank_changes": len(events), "importance_scores": scores,
    }
    if built.handle is not None and prep.spec.method == "alora":
        alloc = built.handle.allocator
        metrics["alora"] = {k: getattr(alloc, k) for k in ("round_steps", "pruned_total", "grown_total", "budget_lost",
                                                           "round_seconds")}
        metrics["alora"]["expected_cost"] = alloc.expected_cost()
    return metrics


def _run_config(prep: Prepared, built: Built, fitted: Fitted, t_start: float, record: dict | None) -> dict:
    spec, task, max_steps = prep.spec, prep.task, int(fitted.trainer.state.max_steps)
    schedule = None
    if built.handle is not None:
        try:
            schedule = schedule_dict(built.handle.config, max_steps)
        except Exception:  # noqa: BLE001  (already validated before training)
            schedule = None
    plan = built.plan
    return {
        RUN_MARKER: True,
        "argv": list(sys.argv),
        "task": task.name,
        "task_spec": {"kind": task.kind, "num_labels": task.num_labels, "label_names": task.label_names,
                      "metric_names": list(task.metric_names), "text_fields": list(task.text_fields),
                      "label_field": task.label_field},
        "data_dir": abspath_or_none(spec.data_dir), "train_file": abspath_or_none(spec.train_file),
        "eval_file": abspath_or_none(spec.eval_file),
        "text_columns": spec.text_columns, "label_column": spec.label_column,
        "max_train_samples": spec.max_train_samples, "max_eval_samples": spec.max_eval_samples,
        "n_train": len(prep.train), "n_eval": len(prep.evals),
        "alora_validation_examples": None if prep.val_examples is None else len(prep.val_examples),
        "model": prep.model_path, "gguf_file": prep.gguf_file, "model_class": type(prep.model).__name__,
        "model_type": getattr(prep.model.config, "model_type", None),
        "method": spec.method, "r": spec.r, "method_config": built.method_config,
        "target_modules": list(prep.module_names), "modules_to_save": prep.head,
        "pooling": spec.pooling,
        "schedule": schedule, "total_steps": max_steps,
        "training": {"epochs": spec.epochs, "max_steps": spec.max_steps, "batch_size": spec.batch_size,
                     "eval_batch_size": fitted.eval_batch_size, "grad_accum": spec.grad_accum, "lr": spec.lr,
                     "warmup_ratio": spec.warmup_ratio, "weight_decay": spec.weight_decay, "seed": spec.seed,
                     "max_length": prep.max_length, "eval_steps": spec.eval_steps,
                     "logging_steps": fitted.logging_steps, "bf16": spec.bf16, "group_by_length": fitted.grouped,
                     "max_new_tokens": spec.max_new_tokens, "threads": torch.get_num_threads()},
        "gelora": None if plan is None else {"samples": plan.n_samples, "pooling": plan.pooling,
                                              "alpha_scale": plan.alpha_scale},
        "args": dataclasses.asdict(spec),
        "versions": versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t_start)),
        **(record or {}),
    }


def save_run(prep: Prepared, built: Built, fitted: Fitted, run_dir: Path, t_start: float,
             record: dict | None = None) -> dict:
    """Write adapter/, peft/, rank_history.jsonl, metrics.json, config.json and figures/ into ``run_dir``;
    returns the metrics. ``record`` adds to config.json (the CLI records its arguments there)."""
    if built.handle is None:  # PEFT-trained: the elalora callback's checks did not run
        for n, prm in built.peft_model.named_parameters():
            if prm.requires_grad and not bool(torch.isfinite(prm).all()):
                raise TrainingDivergedError(diverged_message(int(fitted.trainer.state.global_step), f"the weight {n}"))
    final_pattern, counts, events, scores = _save_adapters(built, run_dir, prep.model_path, prep.spec.export_layout)
    write_run_docs(run_dir, prep.model, prep.spec.export_layout)  # elalora_head.json, peft/README.md
    with open(run_dir / "rank_history.jsonl", "w") as f:
        for e in events:
            f.write(json.dumps(e, default=json_default) + "\n")
    metrics = _metrics(prep, built, fitted, final_pattern, counts, events, scores, t_start)
    metrics.update(trivial_report(prep.task, prep.evals, fitted.final, pooling=prep.spec.pooling, lr=prep.spec.lr,
                                  steps=int(fitted.trainer.state.global_step)))
    write_json(run_dir / "metrics.json", metrics)
    write_json(run_dir / "config.json", _run_config(prep, built, fitted, t_start, record))
    if prep.spec.figures:
        write_figures(run_dir, built.initial_pattern, final_pattern, events, scores,
                      built.plan.to_dict() if built.plan else None, int(fitted.trainer.state.max_steps))
    metrics["total_runtime_s"] = round(time.time() - t_start, 2)
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def write_figures(run_dir: Path, initial, final, events, scores, plan: dict | None, total_steps) -> list[str]:
    """Draw the run's figures; a failure is a warning (a figure must not cost a finished run)."""
    try:
        from .. import plots

        return plots.write_all_figures(run_dir, initial=initial, final=final, events=events, scores=scores,
                                       ids=(plan or {}).get("intrinsic_dims"),
                                       block_ranks=(plan or {}).get("block_ranks"), total_steps=total_steps)
    except Exception as e:  # noqa: BLE001  (a figure must not cost a finished run)
        log(f"warning: could not draw the figures ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
            f"retry with 'elalora plot {run_dir}'")
        return []


# ------------------------------------------------------------------------------------------- all of it
def train(spec: RunSpec, out_dir: str | Path | None = None, *, overwrite: bool = False,
          record: dict | None = None, callbacks: Sequence[Any] | None = None) -> RunResult | None:
    """Run :func:`prepare`, :func:`build`, :func:`fit` and :func:`save_run` into ``out_dir`` (default
    ``runs/<task>-<method>-r<r>``), atomically. Returns ``None`` on non-main processes of a DDP launch.
    ``callbacks``: more Trainer callbacks (:func:`fit`)."""
    t_start = time.time()
    quiet_transformers()
    get_task(spec.task)  # unknown task: TaskError before anything else
    out = Path(out_dir).expanduser() if out_dir is not None else default_output_dir(spec)
    inputs = [("--model", spec.model), ("--data-dir", spec.data_dir), ("--train-file", spec.train_file),
              ("--eval-file", spec.eval_file)]
    check_output_dir(out, overwrite, inputs=inputs)
    if not is_main_process():
        return _train_into(spec, out, t_start, record, callbacks)
    with output_lock(out):  # a second `train` into the same directory fails now, not silently later
        check_output_dir(out, overwrite, inputs=inputs)  # again: another job may have just finished
        return _train_into(spec, out, t_start, record, callbacks)


def _train_into(spec: RunSpec, out: Path, t_start: float, record: dict | None,
                callbacks: Sequence[Any] | None = None) -> RunResult | None:
    prep = prepare(spec)
    with tempfile.TemporaryDirectory(prefix="elalora-trainer-") as trainer_dir:
        # Under DDP every process trains and evaluates (both are collective); only the main process
        # writes the run directory, the others write into a scratch folder that is thrown away.
        target = atomic_directory(out) if is_main_process() else tempfile.TemporaryDirectory(prefix="elalora-rank-")
        with target as tmp:
            built = build(prep, Path(tmp))
            fitted = fit(prep, built, trainer_dir, callbacks=callbacks)
            metrics = save_run(prep, built, fitted, Path(tmp), t_start, record)
    if metrics.get("learned_nothing") and is_main_process():
        log(metrics["learned_nothing"])
    return RunResult(out, metrics) if is_main_process() else None
