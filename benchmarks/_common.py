"""Helpers shared by the benchmark scripts: machine description, timing, Markdown output, and training runs
through the public recipe (:func:`elalora.recipe.train`; the benchmarks never drive the CLI). Records (read,
append, carry-over, provenance) live in ``_records.py``, statistics in ``_stats.py``, the arms in ``arms.py``."""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

from _records import RESULTS, write_json  # noqa: F401  (re-exported: the timing benchmarks write here)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return []


def machine_info(threads: int) -> dict:
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count()
    info = {
        "cpu": cpu_model(), "cores_available": cores, "torch_threads": threads,
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_start": loadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        import peft
        import transformers

        info["peft"], info["transformers"] = peft.__version__, transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])


def median(xs) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def iqr(xs) -> tuple[float, float]:
    if len(xs) < 4:
        return (min(xs), max(xs)) if xs else (float("nan"), float("nan"))
    q = statistics.quantiles(xs, n=4)
    return float(q[0]), float(q[2])


def write_doc_block(doc: Path, begin: str, end: str, body: str, heading: str) -> None:
    """Replace the text between the ``begin``/``end`` markers of ``doc`` with ``body``; without the
    markers, append ``heading`` and the marked block at the end."""
    text = doc.read_text() if doc.exists() else ""
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        _, post = rest.split(end, 1)
        text = pre + block + post
    else:
        text = text.rstrip() + f"\n\n{heading}\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


def machine_md(info: dict) -> str:
    return (f"Machine: {info['cpu']}, {info['cores_available']} cores available, torch {info['torch']} "
            f"({info['torch_threads']} threads), Python {info['python']}"
            + (f", peft {info.get('peft')}, transformers {info.get('transformers')}" if info.get("peft") else "")
            + f"; load average at start {info['loadavg_start']}, at end {info.get('loadavg_end')}; {info['date']}.")


def write_results(out: str, res: dict, md: str, *, quick: bool = False) -> None:
    """Print the Markdown report and, unless ``quick``, write ``<out>.json`` and ``<out>.md``."""
    print(md)
    if not quick:
        write_json(Path(out + ".json"), res)
        Path(out + ".md").write_text(md)
        print(f"wrote {out}.json and .md")



# ----------------------------------------------------------------------------------- runs through the recipe
# RunSpec fields whose `elalora train` flag is not "--" + the name with dashes
_NEGATED_FLAGS = {"figures": "--no-figures", "group_by_length": "--no-group-by-length",
                  "alora_keep_budget": "--alora-paper-budget"}


def train_argv(fields: dict, out_dir: str | Path | None = None) -> list[str]:
    """The ``elalora train`` arguments equivalent to ``RunSpec(**fields)`` run into ``out_dir`` (with
    ``--overwrite``): a description of a cell for its record and for humans to rerun it (fields left
    ``None`` are not given; lists are comma-separated). The benchmarks run the recipe itself."""
    a = ["train"]
    for name, value in fields.items():
        if value is None:
            continue
        if name in _NEGATED_FLAGS:
            a += [] if value else [_NEGATED_FLAGS[name]]
        elif name == "load_in_bits":
            a.append(f"--load-in-{value}bit")
        elif isinstance(value, bool):
            a += [f"--{name.replace('_', '-')}"] if value else []
        else:
            a += [f"--{name.replace('_', '-')}",
                  ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
    if out_dir is not None:
        a += ["--output-dir", str(out_dir), "--overwrite"]
    return a


def train_cell(fields: dict, out: Path, callbacks=None) -> dict:
    """Train ``RunSpec(**fields)`` into the run directory ``out`` with :func:`elalora.recipe.train` (in this
    process) and return a cell's record fields, read from the run's metrics.json and config.json:
    ``spec`` (the RunSpec fields given) and ``argv`` (:func:`train_argv`, the same run as a command)."""
    from elalora.recipe import RunSpec, train

    spec = RunSpec(**fields)
    result = train(spec, out, overwrite=True, callbacks=callbacks)
    m = result.metrics
    cfg = json.loads((Path(out) / "config.json").read_text())
    params = m.get("parameters", {})
    return {"final": m["final"], "main_metric": m["main_metric"], "steps": m["steps"],
            "train_runtime_s": m.get("train_runtime_s"), "trainable_params": params.get("trainable"),
            "active_params": params.get("active"), "total_rank": m.get("total_rank"),
            "rank_pattern": m.get("rank_pattern"), "initial_rank_pattern": m.get("initial_rank_pattern"),
            "n_matrices": len(m.get("rank_pattern") or {}), "rank_changes": m.get("rank_changes"),
            "method_config": cfg.get("method_config"), "schedule": cfg.get("schedule"),
            "threads": cfg.get("training", {}).get("threads"), "runner": "elalora.recipe.train (in-process)",
            "spec": dict(fields), "argv": train_argv(fields, out)}


def run_cells(todo: list[tuple], run, *, jobs: int = 1, done=None, describe=str) -> None:
    """Run ``run(*cell)`` for every cell of ``todo`` and hand each record to ``done(rec)``; a failing cell is
    reported on stderr and does not stop the rest. With ``jobs`` > 1 each cell runs in a fresh process (spawn:
    nothing leaks between cells) and only this process calls ``done`` (the one writer of the records)."""
    import gc
    import multiprocessing
    import traceback
    from concurrent.futures import ProcessPoolExecutor, as_completed

    done = done or (lambda rec: None)
    if jobs <= 1:
        for c in todo:
            print(f"=== cell {describe(c)} (load {loadavg()})", flush=True)
            try:
                done(run(*c))
            except Exception:  # noqa: BLE001  (one failing cell must not stop the grid)
                print(f"cell {describe(c)} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            gc.collect()
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
        futs = {pool.submit(run, *c): c for c in todo}
        for fut in as_completed(futs):
            try:
                done(fut.result())
            except Exception:  # noqa: BLE001
                print(f"cell {describe(futs[fut])} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
