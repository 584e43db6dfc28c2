"""The orthogonal-regulariser default checked on a real task it was not tuned on.

Runs cells of the accuracy grid (benchmarks/accuracy.py: same RunSpec fields, model, data, steps)
with ``orth_reg_weight`` (``--orth-reg-weight``) replaced by the value given here, and appends them to
``benchmarks/results/orth_reg_check.jsonl``; the grid's own cells (γ = 0.1) are the comparison.

    nice -n 10 python benchmarks/orth_reg_check.py --tasks stsb --methods elalora --seeds 0,1,2 --gamma 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import accuracy  # noqa: E402
from _records import append_record, read_records  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "orth_reg_check.jsonl"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="stsb")
    ap.add_argument("--methods", default="elalora")
    ap.add_argument("--r", type=int, default=2)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=accuracy.DEFAULT_STEPS)
    ap.add_argument("--gamma", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    done = {(r["task"], r["method"], r["r"], r["seed"], r["steps"], r["orth_reg_weight"])
            for r in read_records(OUT)}
    for task in args.tasks.split(","):
        for method in args.methods.split(","):
            for seed in [int(s) for s in args.seeds.split(",")]:
                key = (task, method, args.r, seed, args.steps, args.gamma)
                if key in done:
                    continue
                rec = accuracy.run_recipe_cell(task, method, args.r, seed, args.steps, accuracy.default_data_dir(),
                                               args.threads, overrides={"orth_reg_weight": args.gamma})
                rec.update(task=task, method=method, r=args.r, seed=seed, steps=args.steps, orth_reg_weight=args.gamma,
                           main=rec["final"][rec["main_metric"]])
                print(task, method, seed, "γ", args.gamma, rec["main_metric"], rec["main"], flush=True)
                append_record(rec, OUT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
