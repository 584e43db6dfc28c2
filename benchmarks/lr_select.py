"""Learning rate per method family, chosen on a split of the training data (the protocol v3 candidate).

Protocol v2 (benchmarks/accuracy.py) set one lr for both method families from PEFT LoRA's dev-set
curves, and CoLA's lr (3e-4) leaves the SVD-form methods at the majority answer while 1e-3 lets them
learn (docs/results.md §1). Choosing an lr per family on the GLUE dev set would tune on the set we
report; this script chooses it on held-out *training* data instead:

1. ``write_split`` copies each task's ``train.tsv`` into ``--split-dir``: a seeded 80 % as
   ``train.tsv``, the other 20 % as ``dev.tsv`` (rows copied verbatim, header and BOM kept, so the
   loaders parse them exactly as the originals; the GLUE dev set is never read);
2. each family's PEFT reference method (``peft-lora`` for the LoRA family, ``peft-adalora`` for the
   SVD-form family, so that none of our own methods picks its own lr) runs under the protocols
   ``select-lr{3e-4,1e-3,3e-3}`` (v2's knobs, epochs over the 80 %, one lr everywhere) through
   accuracy.py's harness: ``--jobs``, resume, one JSON line per cell in
   ``benchmarks/results/lr_select.jsonl``;
3. the table gives the held-out score of each (task, family, lr) and the lr with the best mean over the
   seeds: the lr of that family on that task in protocol v3.

    python benchmarks/lr_select.py --jobs 2            # run what is missing, then print the table
    python benchmarks/lr_select.py --table             # only the table (and the v3 lr dict)
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import accuracy as A  # noqa: E402
from _records import RESULTS, read_records  # noqa: E402
from arms import label  # noqa: E402

JSONL = RESULTS / "lr_select.jsonl"
FAMILY_METHOD = {"lora": "peft-lora", "svd": "peft-adalora"}


def write_split(src: Path, dst: Path, task: str, *, held_out: float = 0.2, seed: int = 0) -> tuple[int, int]:
    """Split ``src/<Task>/train.tsv`` into ``dst/<Task>/{train,dev}.tsv``; returns (n_train, n_held_out).

    Lines are copied as they are (GLUE TSVs are read with ``csv.QUOTE_NONE``: one line, one row). The
    split is a seeded permutation of the data rows, so the same seed gives the same split anywhere."""
    from elalora.tasks import glue_layout

    folder_name, has_header = glue_layout(task)
    lines = (src / folder_name / "train.tsv").read_bytes().splitlines(keepends=True)
    head, rows = (lines[:1], lines[1:]) if has_header else ([], lines)
    rows = [r for r in rows if r.strip()]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_out = int(round(held_out * len(rows)))
    out_idx, in_idx = sorted(order[:n_out]), sorted(order[n_out:])
    folder = dst / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    for name, idx in (("train.tsv", in_idx), ("dev.tsv", out_idx)):
        tmp = folder / (name + ".tmp")
        tmp.write_bytes(b"".join(head + [rows[i] if rows[i].endswith(b"\n") else rows[i] + b"\n" for i in idx]))
        tmp.replace(folder / name)
    return len(in_idx), len(out_idx)


def selection_table(records: list[dict], tasks, seeds) -> tuple[str, dict]:
    """Markdown table of held-out scores per (task, family, lr) and the chosen lr per (task, family)."""
    by = {}
    for r in records:
        proto = r.get("protocol") or ""
        if proto.startswith("select-lr") and int(r["seed"]) in seeds:
            by.setdefault((r["task"], r["method"], proto.removeprefix("select-lr")), []).append(100 * r["main"])
    head = ["task", "family (method)"] + [f"lr {lr}" for lr in A.SELECT_LRS] + ["chosen"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    chosen: dict[str, dict[str, float]] = {}
    for t in tasks:
        for fam, m in FAMILY_METHOD.items():
            cells, means = [], {}
            for lr in A.SELECT_LRS:
                v = by.get((t, m, lr))
                if not v:
                    cells.append("pending")
                    continue
                means[lr] = statistics.mean(v)
                cells.append(f"{means[lr]:.1f}" + (f" ± {statistics.stdev(v):.1f}" if len(v) > 1 else "")
                             + ("" if len(v) == len(seeds) else f" ({len(v)} of {len(seeds)} seeds)"))
            pick = max(means, key=means.get) if len(means) == len(A.SELECT_LRS) else None
            if pick is not None:
                chosen.setdefault(t, {})[fam] = float(pick)
            lines.append(f"| {t.upper()} ({A.METRIC_NAME[t]}) | {fam} ({label(m)}) | " + " | ".join(cells)
                         + f" | {pick or 'pending'} |")
    return "\n".join(lines), chosen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(A.TASKS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--data-dir", default=A.default_data_dir(), help="the GLUE folder whose train.tsv files are split")
    ap.add_argument("--split-dir", default=str(HERE.parent / "runs" / "glue_lr_select"),
                    help="where the 80/20 split of the training files is written (default %(default)s)")
    ap.add_argument("--table", action="store_true", help="only print the table")
    args = ap.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if not args.table:
        for t in tasks:
            n_in, n_out = write_split(Path(args.data_dir), Path(args.split_dir), t)
            print(f"{t}: {n_in} training rows, {n_out} held out (of train.tsv) -> {args.split_dir}", flush=True)
        for lr in A.SELECT_LRS:
            A.main(["--protocol", f"select-lr{lr}", "--tasks", ",".join(tasks), "--methods",
                    ",".join(FAMILY_METHOD.values()), "--r", "8", "--no-extra", "--seeds", ",".join(map(str, seeds)),
                    "--jobs", str(args.jobs), "--threads", "1", "--data-dir", args.split_dir,
                    "--results", str(JSONL), "--no-render"])
    table, chosen = selection_table(read_records(JSONL), tasks, seeds)
    print(table)
    print(f"\nv3 lr per task and family: {chosen}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
