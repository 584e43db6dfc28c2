"""The ElaLoRA paper's layer-contribution study over the accuracy grid's kept ElaLoRA runs, aggregated over seeds.

    # the grid keeps its run directories with --keep-runs DIR (DIR/PROTOCOL/TASK-METHOD-rR-sSEED)
    python benchmarks/accuracy.py --protocol v2 --methods elalora --r 8 --keep-runs runs/grid
    # run `elalora analyze` on every kept run that has no analysis yet, then aggregate and render
    python benchmarks/layer_contribution.py --runs runs/grid --threads 1
    # only aggregate the analyses that exist and render the table into docs/results/layer_contribution.md
    python benchmarks/layer_contribution.py --runs runs/grid --render
    # another study: the v3 grid's ElaLoRA runs on the LoRA form (grace 1, the library's default)
    python benchmarks/layer_contribution.py --runs runs/grid --protocol v3 --method elalora-lora-g1 --threads 1

For each run, ``elalora analyze`` switches off the adapters of the k matrices with the highest final ranks
("top"), then of the k with the lowest ("bottom"), then of k random ones (3 draws), k = 10 % and 25 % of
the 36 matrices, and records the drop of the task's main metric on the dev set
(:mod:`elalora.recipe.analysis`; run here through :func:`elalora.recipe.evaluation.analyze_run`, what
``elalora analyze`` runs). This script collects one record per run into
the study's JSON-lines file (:func:`study_paths`: ``benchmarks/results/layer_contribution.jsonl`` for the first
study, protocol v2's SVD-form ElaLoRA at r 8; ``layer_contribution_PROTOCOL_METHOD_rR.jsonl`` for any other)
and renders, into the study's own block of docs/results/layer_contribution.md, per task and k, the mean drop
over seeds of each group, and the paired difference top − bottom with its 95 % interval. The paper's claim ("layers
receiving higher rank allocations contribute more significantly") predicts top > random > bottom.

The control (``--control-method peft-lora``, on ``--control-tasks``): the same top and bottom sets
switched off in the uniform-rank PEFT LoRA run of the same task and seed (``elalora analyze LORA_RUN
--ranks-from ELALORA_RUN``). A top set that matters there too matters for what the matrices are
(e.g. their type and layer), not only for the rank ElaLoRA gave them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_doc_block  # noqa: E402
from _records import RESULTS  # noqa: E402
from _stats import paired_cell  # noqa: E402
from arms import label  # noqa: E402
from glue_protocols import METRIC_NAME, TASKS  # noqa: E402

JSONL = RESULTS / "layer_contribution.jsonl"
DOC = ROOT / "docs" / "results" / "layer_contribution.md"
#: (protocol, grid arm, r) of each study whose table docs/results/layer_contribution.md shows; the first is
#: protocol v2's SVD-form ElaLoRA, the second the v3 grid's ElaLoRA at the library's defaults (LoRA form,
#: grace 1 round).
STUDIES = [("v2", "elalora", 8), ("v3", "elalora-lora-g1", 8)]


def study_paths(protocol: str, method: str, r: int) -> tuple[Path, str]:
    """``(JSON-lines file, doc block name)`` of one study. Each study has its own file, because the file is
    rewritten whole from the analyses found (it is their aggregate), and its own block in
    docs/results/layer_contribution.md."""
    if (protocol, method, r) == STUDIES[0]:
        return JSONL, "layer-contribution-table"
    return (RESULTS / f"layer_contribution_{protocol}_{method}_r{r}.jsonl",
            f"layer-contribution-{protocol}-{method}-r{r}")


def render_study(recs: list[dict], control_method: str = "peft-lora") -> str:
    """The study's block: the ablation table and, where the records have one, the control's."""
    table = render(recs)
    ctrl = render_control(recs, label(control_method))
    return table + ("\n\n" + ctrl if ctrl else "")


def run_dirs(runs: Path, protocol: str, method: str, r: int, tasks, seeds) -> list[tuple[str, int, Path]]:
    out = []
    for t in tasks:
        for s in seeds:
            d = runs / protocol / f"{t}-{method}-r{r}-s{s}"
            if (d / "config.json").is_file() and (d / "metrics.json").is_file():
                out.append((t, s, d))
    return out


def analyze(d: Path, threads: int | None, **kw) -> None:
    """The analysis of ``elalora analyze D`` (:func:`elalora.recipe.evaluation.analyze_run`, in-process);
    ``kw``: its options, e.g. ``ranks_from=RUN`` for the control."""
    from elalora.recipe.evaluation import analyze_run

    res = analyze_run(d, threads=threads, progress=lambda msg: print(msg, flush=True), **kw)
    print(f"\n{res.table}\n" + "".join(f"wrote {p}\n" for p in res.written), flush=True)


def record(task: str, seed: int, d: Path, protocol: str, method: str, r: int, control: Path | None = None) -> dict:
    a = json.loads((d / "analysis" / "layer_contribution.json").read_text())
    ctrl = None
    if control is not None and (control / "analysis" / "layer_contribution_ranks_from.json").is_file():
        c = json.loads((control / "analysis" / "layer_contribution_ranks_from.json").read_text())
        ctrl = {"run": control.name, "baseline": c["baseline"][c["main_metric"]], "summary": c["summary"]}
    ranks = list((json.loads((d / "metrics.json").read_text()).get("rank_pattern") or {}).values())
    return {"task": task, "seed": seed, "protocol": protocol, "method": method, "r": r, "run": d.name,
            "main_metric": a["main_metric"], "baseline": a["baseline"][a["main_metric"]], "n_eval": a["n_eval"],
            "n_matrices": a["n_matrices"], "total_rank": a["total_rank"], "summary": a["summary"],
            "final_rank_min": min(ranks) if ranks else None, "final_rank_max": max(ranks) if ranks else None,
            "control": ctrl}


def render_control(recs: list[dict], control_label: str) -> str:
    """The ElaLoRA runs' top and bottom sets switched off in the uniform-rank run of the same seed."""
    by = {}
    for rec in recs:
        if rec.get("control"):
            by.setdefault(rec["task"], {})[rec["seed"]] = rec
    if not by:
        return ""
    head = ["task", "seeds", "k", f"{control_label} without ablation", "drop: ElaLoRA's top set off",
            "drop: ElaLoRA's bottom set off", "top − bottom (paired)", "same in the ElaLoRA run",
            "ElaLoRA's top − bottom minus the control's (paired)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]

    def ms(v):
        return f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"

    def drops(summary, f):
        got = {x["group"]: 100 * x["drop_mean"] for x in summary if x["fraction"] == f}
        return got.get("top"), got.get("bottom")

    for t in [t for t in TASKS if t in by]:
        seeds = sorted(by[t])
        for f in sorted({x["fraction"] for s in seeds for x in by[t][s]["control"]["summary"]}):
            ct = [drops(by[t][s]["control"]["summary"], f) for s in seeds]
            el = [drops(by[t][s]["summary"], f) for s in seeds]
            k = next(x["k"] for x in by[t][seeds[0]]["control"]["summary"] if x["fraction"] == f)
            base = [100 * by[t][s]["control"]["baseline"] for s in seeds]
            lines.append("| " + " | ".join([
                f"{t.upper()} ({METRIC_NAME[t]})", str(len(seeds)), f"{k} ({f:.0%})", ms(base),
                ms([c[0] for c in ct]), ms([c[1] for c in ct]), paired_cell([c[0] - c[1] for c in ct]),
                paired_cell([e[0] - e[1] for e in el]),
                paired_cell([(e[0] - e[1]) - (c[0] - c[1]) for e, c in zip(el, ct)])]) + " |")
    return "\n".join(lines) + (
        f"\n\nControl: in the {control_label} run of the same seed (uniform rank r on every matrix), the adapters "
        "of the matrices that ElaLoRA's run ranked top (bottom) are switched off (`elalora analyze RUN "
        "--ranks-from ELALORA_RUN`). If ElaLoRA's top set matters only because ElaLoRA gave it more rank, its "
        "drop here is no larger than the bottom set's; the last column asks whether the rank ElaLoRA gave its top "
        "set made it matter more than it does at uniform rank.")


def render(recs: list[dict]) -> str:
    by = {}
    for rec in recs:
        by.setdefault(rec["task"], {})[rec["seed"]] = rec
    head = ["task", "seeds", "metric without ablation", "k", "drop: top ranks off", "drop: random off",
            "drop: bottom ranks off", "top − bottom (paired)", "ranks off: top / random / bottom"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]

    def ms(v):
        return f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"

    for t in [t for t in TASKS if t in by]:
        seeds = sorted(by[t])
        base = [100 * by[t][s]["baseline"] for s in seeds]
        fractions = sorted({row["fraction"] for s in seeds for row in by[t][s]["summary"]})
        for f in fractions:
            drop, off = {}, {}
            k = None
            for g in ("top", "random", "bottom"):
                vals, ranks = {}, []
                for s in seeds:
                    row = next((x for x in by[t][s]["summary"] if x["fraction"] == f and x["group"] == g), None)
                    if row is not None:
                        vals[s] = 100 * row["drop_mean"]
                        ranks.append(row["rank_off_mean"])
                        k = row["k"]
                drop[g], off[g] = vals, (f"{statistics.mean(ranks):.0f}" if ranks else "–")
            both = sorted(set(drop["top"]) & set(drop["bottom"]))
            pair = paired_cell([drop["top"][s] - drop["bottom"][s] for s in both]) if both else "–"
            lines.append("| " + " | ".join([f"{t.upper()} ({METRIC_NAME[t]})", str(len(seeds)), ms(base),
                                            f"{k} ({f:.0%})", *(ms(list(drop[g].values())) if drop[g] else "–"
                                                               for g in ("top", "random", "bottom")), pair,
                                            " / ".join(off[g] for g in ("top", "random", "bottom"))]) + " |")
    return "\n".join(lines) + (
        "\n\nScores ×100. A drop is the metric with every adapter on minus the metric with k adapters off (positive: "
        "the switched-off adapters helped); random: mean of 3 draws per run. Mean ± std over seeds (one ElaLoRA "
        "run per seed); top − bottom: paired by seed, mean [95 % t-interval], *win* when the top-rank adapters "
        "matter more, *tie* when the interval contains 0. Ranks off: the total final rank of the k matrices "
        "switched off, mean over seeds (and draws): the top group always removes more rank than a random one.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", required=True, help="the accuracy grid's --keep-runs folder")
    ap.add_argument("--protocol", default="v2")
    ap.add_argument("--method", default="elalora")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--control-method", default="peft-lora",
                    help="the uniform-rank method whose kept run of the same task and seed gets the ElaLoRA run's "
                         "top/bottom sets switched off (default %(default)s; 'none' to skip)")
    ap.add_argument("--control-tasks", default="stsb",
                    help="tasks for the control (default %(default)s: a control costs 7 evaluations per seed)")
    ap.add_argument("--render", action="store_true", help="do not analyze; aggregate what exists and render")
    ap.add_argument("--results", default=None,
                    help="JSON-lines file (default: the study's own, see study_paths; rewritten whole)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    found = run_dirs(Path(args.runs), args.protocol, args.method, args.r,
                     [t for t in args.tasks.split(",") if t], [int(s) for s in args.seeds.split(",") if s])
    if not found:
        ap.error(f"no kept runs under {args.runs}/{args.protocol}/ for method {args.method} at r={args.r}")
    recs = []
    control_tasks = [t for t in args.control_tasks.split(",") if t] if args.control_method != "none" else []
    for t, s, d in found:
        if not (d / "analysis" / "layer_contribution.json").is_file():
            if args.render:
                print(f"{d}: no analysis yet (skipped)")
                continue
            analyze(d, args.threads)
        control = None
        if t in control_tasks:
            control = Path(args.runs) / args.protocol / f"{t}-{args.control_method}-r{args.r}-s{s}"
            if not (control / "metrics.json").is_file():
                control = None
            elif not (control / "analysis" / "layer_contribution_ranks_from.json").is_file() and not args.render:
                # the same top/bottom sets in the uniform-rank run (one random draw: 7 evaluations)
                analyze(control, args.threads, ranks_from=d, random_draws=1, figure=False)
        recs.append(record(t, s, d, args.protocol, args.method, args.r, control))
    default_out, block = study_paths(args.protocol, args.method, args.r)
    out = Path(args.results) if args.results else default_out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".jsonl.tmp")  # the file is the aggregate of the analyses found: rewrite it whole
    tmp.write_text("".join(json.dumps(r) + "\n" for r in recs))
    os.replace(tmp, out)
    table = render_study(recs, args.control_method)
    if args.results is None:  # the study's own records: its block in DOC (report.py renders the same)
        write_doc_block(DOC, f"<!-- {block}:begin -->", f"<!-- {block}:end -->", table, "## Layer contribution")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
