"""GLUE accuracy grid on all-MiniLM-L6-v2: task × arm × budget r × seed, one cell at a time: the protocols and
``main`` (the arms are benchmarks/arms.py's; records, statistics and the PEFT baselines are the kit's).

    # run cells (skips the ones already in benchmarks/results/accuracy.jsonl), then render the tables;
    # --jobs 2 runs two cells at a time, one thread each (the fastest use of a 2-core CPU)
    python benchmarks/accuracy.py --protocol v3 --methods peft-lora,elalora-lora-g1 --r 2,8 --no-extra --jobs 2
    # the GLUE rerun (docs/results/glue_power.md): after its pilot (--seeds 0,1,2), the seeds its power rule asks for
    python benchmarks/accuracy.py --protocol v3-rerun --tasks mrpc,stsb --methods peft-lora,elalora-lora-g1 \
        --r 2,8 --seeds power --no-extra --jobs 2
    # only (re)render the tables from what is in the JSONL file (report.py renders every committed doc block)
    python benchmarks/accuracy.py --protocol v3 --render

Every cell appends one JSON line to ``benchmarks/results/accuracy.jsonl`` as soon as it finishes, so an
interrupted grid resumes where it stopped. Cells are keyed by (task, arm, r, seed, steps, protocol).

Every cell runs through the public recipe (:mod:`elalora.recipe`), in-process: the recipe arms with
:func:`elalora.recipe.train` on a :class:`~elalora.recipe.RunSpec` (:func:`cell_fields`; the record keeps the
fields as ``spec`` and the equivalent ``elalora train`` line as ``argv``), PEFT AdaLoRA and PEFT LoRA + EVA with
benchmarks/_peft_cells.py (the same data, model, head, targets, collator and Trainer setup).

A cell's RunSpec fields (:func:`cell_fields`): the protocol's (:data:`PROTOCOLS`) or, without one, :data:`SHARED`
at ``--steps``; the arm's method; t_i 10 %, t_f 20 %, Δt 5 % for the methods with a schedule; γ 0.1 (the papers'
GLUE value) for the SVD-form arms of :data:`ORTH_REG`; the arm's overrides. The library's defaults give the rest.
A budget r is an average final rank of r per adapted matrix for every arm. Tables and readings:
docs/results/glue_grid.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _records as R  # noqa: E402
import _stats as S  # noqa: E402
from _common import cpu_model, loadavg, md_table, run_cells, train_cell, write_doc_block  # noqa: E402
from _peft_cells import peft_adalora, peft_lora_eva, peft_prepare  # noqa: E402
from arms import ARMS, SCHEDULED, label  # noqa: E402
from glue_protocols import (DEFAULT_STEPS, DELTA_T, LR_FAMILY, METRIC_NAME, PROTOCOLS, RERUN,  # noqa: E402, F401
                            SELECT_LRS, SHARED, TARGETS, TASKS, TRIVIAL, cell_settings, cell_shared, default_data_dir,
                            model_path, protocol_settings, protocol_steps)

JSONL = R.RESULTS / "accuracy.jsonl"
DOC = ROOT / "docs" / "results" / "glue_grid.md"
BEGIN, END = "<!-- accuracy-table:begin -->", "<!-- accuracy-table:end -->"

#: The grid's arms (benchmarks/arms.py), in table order.
METHODS = ["peft-lora", "peft-lora-eva", "peft-adalora", "adalora", "elalora", "alora", "gelora", "gelora-elalora",
           "elalora-lora", "elalora-lora-params", "elalora-lora-g1", "adalora-lora"]
#: The SVD-form arms the grid runs with the orthogonal regulariser at γ 0.1 (the papers' GLUE value); the
#: LoRA form has none, and the library's default is γ 0 (docs/results/planted_rank.md).
ORTH_REG = {"adalora", "elalora", "gelora-elalora"}
DEFAULT_R = [2, 8]
EXTRA_R = {4: ["peft-adalora", "adalora"]}  # AdaLoRA also at r = 4 (ElaLoRA r=2 vs AdaLoRA r=4)
render_table = partial(S.grid_table, extra=EXTRA_R, metric_names=METRIC_NAME)
targets_table = partial(S.targets_table, trivial=TRIVIAL, targets=TARGETS, metric_names=METRIC_NAME)
paired_table = partial(S.paired_table, metric_names=METRIC_NAME)
paired_cell, t_quantile = S.paired_cell, S.t_quantile


def cell_key(task, method, r, seed, steps, protocol=None) -> tuple:
    return (task, method, int(r), int(seed), int(steps), protocol)


def carry_over(records: list[dict], todo: list[tuple], task_steps: dict, *, source: str, protocol: str) -> list[dict]:
    """:func:`_records.carry_over` into ``protocol``: the cells whose every setting is identical."""
    proto = protocol_settings(protocol)
    return R.carry_over(records, todo, task_steps, source=source, protocol=protocol,
                        want=lambda t, m, steps: cell_shared(t, m, steps, proto, protocol))


def grid(tasks, methods, rs, seeds, with_extra: bool) -> list[tuple]:
    """Cells ``(task, method, r, seed)``, the arms of one (task, r, seed) next to each other: run in this order
    (``--jobs 2`` runs two at a time), the arms of a comparison are interleaved in time on one machine.
    ``seeds``: a list, or {task: list} (the power rule's seeds differ by task)."""
    cells = []
    for task in tasks:
        task_seeds = seeds[task] if isinstance(seeds, dict) else seeds
        for r in sorted(set(rs) | (set(EXTRA_R) if with_extra else set())):
            for seed in task_seeds:
                for method in methods:
                    if r in rs or method in EXTRA_R.get(r, []):
                        cells.append((task, method, r, seed))
    return cells


def power_plan(records: list[dict], rerun: dict = RERUN, *, strict: bool = True) -> dict[str, dict]:
    """The power rule of ``rerun`` (glue_protocols.RERUN; docs/results/glue_power.md) on the pilot's records:
    per task, per r, the paired differences method − baseline (scores ×100) of the pilot seeds, their sd and the
    seeds a 1-point difference needs (``_stats.power_seeds``); and the task's ``seeds``: the largest of those
    over its r, capped, which every cell of the task gets. The rule reads only the sd, never the sign or the
    mean, so it adds seeds alike to cells that lean either way. While a pilot cell is missing: SystemExit if
    ``strict``, else the plan of what there is (a task's ``seeds`` None)."""
    got: dict = {}
    for rec in records:
        if rec.get("protocol") == rerun["protocol"]:
            got.setdefault((rec["task"], rec["method"], int(rec["r"])), {})[int(rec["seed"])] = 100 * rec["main"]
    plan, missing = {}, []
    for task in rerun["tasks"]:
        rows = {}
        for r in rerun["rs"]:
            a, b = got.get((task, rerun["method"], r), {}), got.get((task, rerun["baseline"], r), {})
            missing += [f"{task} {m} r={r} seed={s}" for m, x in ((rerun["method"], a), (rerun["baseline"], b))
                        for s in rerun["pilot_seeds"] if s not in x]
            d = [a[s] - b[s] for s in rerun["pilot_seeds"] if s in a and s in b]
            sd = S.mean_sd(d)[1] if len(d) > 1 else math.nan
            rows[r] = {"d": d, "sd": sd, "asks": S.power_seeds(sd, rerun["effect"], cap=10_000) if d else None}
        complete = all(len(x["d"]) == len(rerun["pilot_seeds"]) for x in rows.values())
        asks = max((x["asks"] or 0) for x in rows.values()) if complete else None
        plan[task] = {"by_r": rows, "asks": asks, "seeds": min(asks, rerun["cap"]) if complete else None}
    if missing and strict:
        raise SystemExit(f"the power rule needs the whole pilot of protocol {rerun['protocol']}; missing "
                         f"{len(missing)} cells ({', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}): run "
                         f"python benchmarks/accuracy.py --protocol {rerun['protocol']} --tasks "
                         f"{','.join(rerun['tasks'])} --methods {rerun['baseline']},{rerun['method']} --r "
                         f"{','.join(map(str, rerun['rs']))} --seeds {','.join(map(str, rerun['pilot_seeds']))} "
                         "--no-extra --jobs 2")
    return plan


def power_table(records: list[dict], rerun: dict = RERUN) -> str:
    """The rerun's power rule as a table (docs/results/glue_power.md): per task and r, the paired differences'
    sd, the seeds a 1-point difference asks for, the seeds run and the difference those seeds find with 80 %
    power (``_stats.detectable_effect``); the labelled tasks from their v3 records; and the machines and package
    versions the rerun's records came from (a comparison is never paired across them)."""
    plan = power_plan(records, rerun, strict=False)
    eff, cap = rerun["effect"], rerun["cap"]
    head = ["task", "r", "pilot seeds", "sd of paired difference (points)", f"seeds for {eff:g} point at 80 % power",
            "seeds run", "finds with 80 % power", "status"]
    rows = []
    for task in rerun["tasks"]:
        p = plan[task]
        have = {(x["method"], int(x["r"]), int(x["seed"])) for x in records
                if x.get("protocol") == rerun["protocol"] and x["task"] == task}
        ran = {s for (_, _, s) in have  # seeds whose every cell (both arms, every r) is done
               if all((m, r, s) in have for m in (rerun["method"], rerun["baseline"]) for r in rerun["rs"])}
        for r, x in p["by_r"].items():
            if p["seeds"] is None:
                rows.append([task.upper(), r, len(x["d"]), "pending", "pending", len(ran), "", "pilot pending"])
                continue
            n = p["seeds"]
            capped = f" (cap {cap}): cannot resolve {eff:g} point" if p["asks"] > cap else ""
            status = f"rerun at {n} seeds{capped}" + ("" if len(ran) >= n else f"; {n - len(ran)} seeds to go")
            rows.append([task.upper(), r, len(x["d"]), f"{x['sd']:.2f}", x["asks"], len(ran),
                         f"{S.detectable_effect(x['sd'], n):.2f} points", status])
    old = power_plan(records, {**rerun, "protocol": rerun["labelled_from"], "tasks": rerun["labelled"]}, strict=False)
    for task in rerun["labelled"]:
        for r, x in old[task]["by_r"].items():
            if len(x["d"]) < 2:
                continue
            n = len(x["d"])
            rows.append([task.upper(), r, n, f"{x['sd']:.2f}", x["asks"], f"{n} ({rerun['labelled_from']})",
                         f"{S.detectable_effect(x['sd'], n):.2f} points",
                         f"as {rerun['labelled_from']} left it: cannot resolve {eff:g} point"])
    mine = [x for x in records if x.get("protocol") == rerun["protocol"]]
    machines = sorted({x.get("cpu") or "unrecorded" for x in mine})
    versions = {json.dumps((x.get("provenance") or {}).get("versions"), sort_keys=True) for x in mine}
    where = (f"All {len(mine)} cells ran on one machine ({machines[0]}) with one set of package versions."
             if len(machines) == 1 and len(versions) == 1 else
             f"**The {len(mine)} cells came from {len(machines)} machines and {len(versions)} sets of package "
             "versions: not one batch; rerun them on one machine.**") if mine else "No cell has run yet."
    return md_table(head, rows) + (
        f"\n\nSeeds for a paired two-sided t-test at 5 % to find {eff:g} point with 80 % power, from the sd of the "
        f"pilot's differences (ElaLoRA at its defaults − PEFT LoRA, seeds "
        f"{', '.join(map(str, rerun['pilot_seeds']))}); "
        f"every cell of a task gets the largest over its r, at most {cap}. {where}")


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
    """The RunSpec fields of one cell trained by the recipe: :func:`shared_fields`, the arm's method, the
    schedule knobs (t_i, t_f, Δt; for the methods that have a schedule), γ 0.1 (``ORTH_REG``) and the arm's
    overrides (benchmarks/arms.py); ``overrides`` ({field: value}) replaces or adds fields
    (benchmarks/orth_reg_check.py: ``{"orth_reg_weight": 0.0}``)."""
    arm = ARMS[method]
    f = {**shared_fields(task, method, r, seed, steps, data_dir, threads, proto), "method": arm.method}
    if arm.method in SCHEDULED:
        f.update(tinit=0.1, tfinal=0.2, delta_t=DELTA_T)
    if method in ORTH_REG:
        f["orth_reg_weight"] = 0.1
    f.update(arm.overrides)
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


def run_cell(task, method, r, seed, steps, data_dir, threads, protocol=None, keep_runs=None) -> dict:
    import torch

    proto = protocol_settings(protocol)
    t0 = time.time()
    keep_dir = None
    if method == "peft-adalora":
        prep = peft_prepare(shared_fields(task, method, r, seed, steps, data_dir, threads, proto))
        res = peft_adalora(prep, r=r, steps=steps, delta_t=DELTA_T)
    elif method == "peft-lora-eva":
        res = peft_lora_eva(peft_prepare(shared_fields(task, method, r, seed, steps, data_dir, threads, proto)), r=r)
    else:
        keep_dir = kept_run_dir(keep_runs, task, method, r, seed, protocol)
        res = run_recipe_cell(task, method, r, seed, steps, data_dir, threads, proto, keep_dir=keep_dir)
    if keep_dir is not None:
        res["run_dir"] = str(keep_dir)
    shared = cell_shared(task, method, steps, proto, protocol)
    res.update({"task": task, "method": method, "r": r, "seed": seed, "max_steps": steps, "protocol": protocol,
                "main": float(res["final"][res["main_metric"]]), "wall_s": round(time.time() - t0, 1),
                "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                "loadavg": loadavg(), "cpu": cpu_model(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "shared": shared, "provenance": R.provenance()})
    return res


# ----------------------------------------------------------------------------------- tables
def write_heatmaps(records: list[dict], *, steps: int, r: int = 8, seed: int = 0, method: str = "elalora"
                   ) -> list[Path]:
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
                          title=f"{label(method)} r={r}, {rec['task'].upper()} (seed {seed}, {steps} steps): "
                                "final ranks")
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
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated, or 'power': with --protocol "
                    f"{RERUN['protocol']}, the seeds its power rule asks for per task (after the pilot; "
                    "docs/results/glue_power.md)")
    ap.add_argument("--steps", type=int, default=SHARED["max_steps"], help="optimizer steps per cell")
    ap.add_argument("--protocol", default=None, choices=sorted(PROTOCOLS) or None,
                    help="a named protocol (glue_protocols.PROTOCOLS: epochs per task, lr per arm family, pooling, "
                         "max length); replaces --steps and SHARED's lr/max length; its own tables")
    ap.add_argument("--data-dir", default=default_data_dir())
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: the recipe's choice)")
    ap.add_argument("--max-cells", type=int, default=None, help="stop after running this many new cells")
    ap.add_argument("--jobs", type=int, default=1, help="cells run at the same time, each in its own process "
                    "(default 1; with more, each cell gets 1 thread unless --threads is given)")
    ap.add_argument("--render", action="store_true", help="only render the tables into docs/results/glue_grid.md")
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
    ap.add_argument("--no-render", action="store_true", help="after running, do not rewrite docs/results/glue_grid.md")
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
    if set(methods) - set(METHODS):
        _parser().error(f"unknown methods {sorted(set(methods) - set(METHODS))}; choose from {METHODS}")
    rs = [int(x) for x in args.r.split(",") if x]
    SHARED["max_steps"] = args.steps
    if args.seeds == "power":
        if args.protocol != RERUN["protocol"]:
            _parser().error(f"--seeds power needs --protocol {RERUN['protocol']} (the one protocol with a power rule)")
        plan = power_plan(R.read_records(JSONL))
        seeds = {t: list(range(plan[t]["seeds"])) if t in plan else [] for t in tasks}
        print("power rule: " + "; ".join(f"{t} {plan[t]['seeds']} seeds (asks {plan[t]['asks']})" for t in plan),
              flush=True)
    else:
        seeds = [int(x) for x in args.seeds.split(",") if x]
    if args.render:
        return render(args, tasks, methods, seeds)
    done = {cell_key(r["task"], r["method"], r["r"], r["seed"], r.get("max_steps", -1), r.get("protocol"))
            for r in R.read_records(JSONL)}
    proto = protocol_settings(args.protocol)
    task_steps = {t: protocol_steps(proto, t, args.data_dir) if proto else args.steps for t in tasks}
    todo = [c for c in grid(tasks, methods, rs, seeds, not args.no_extra)
            if cell_key(*c, task_steps[c[0]], args.protocol) not in done]
    if args.carry_from:
        if not args.protocol:
            _parser().error("--carry-from needs --protocol")
        carried = carry_over(R.read_records(JSONL), todo, task_steps, source=args.carry_from, protocol=args.protocol)
        for rec in [] if args.dry_run else carried:
            R.append_record(rec, JSONL)
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
        R.append_record(rec, JSONL)
        print(f"=== done: {rec['task']} {rec['method']} r={rec['r']} seed={rec['seed']}: {rec['main_metric']} = "
              f"{rec['main']:.4f} ({rec['wall_s']:.0f} s; load {loadavg()})", flush=True)

    cells = [(*c, task_steps[c[0]], args.data_dir, threads, args.protocol, args.keep_runs) for c in todo]
    run_cells(cells, run_cell, jobs=args.jobs, done=finished,
              describe=lambda c: f"{c[0]} {c[1]} r={c[2]} seed={c[3]} ({c[4]} steps)")
    if not args.no_render:
        render(args, tasks, methods, seeds)


def render(args, tasks, methods, seeds) -> None:
    """Print the tables of ``--protocol`` and let report.py rewrite every committed block from the records (it
    decides what each page shows); or, for a ``--steps`` grid, print its table and write it into its block of
    :data:`DOC` (the main table always shows the full default grid, so that missing cells read "pending"; a
    table of another step budget, a partial grid by design, shows only the tasks and arms it has)."""
    recs = R.read_records(JSONL)
    if isinstance(seeds, dict):  # the power rule's seeds, per task
        seeds = sorted({s for v in seeds.values() for s in v})
    if args.protocol:
        table = render_table(recs, tasks=TASKS, methods=methods, rs=DEFAULT_R, seeds=seeds, steps=-1,
                             with_extra=not args.no_extra, protocol=args.protocol)
        print(table + "\n\n" + paired_table(recs, protocol=args.protocol, tasks=TASKS))
        if JSONL == R.RESULTS / "accuracy.jsonl":  # the committed records: their docs follow them
            import report

            report.write()
            print("rewrote the generated blocks of README.md and docs/results*.md (benchmarks/report.py)")
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
    for p in write_heatmaps(recs, steps=args.steps) if args.figures else []:
        print(f"wrote {p.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
