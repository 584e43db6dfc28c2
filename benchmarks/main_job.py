"""The README's main job, run as a new user runs it, recorded for the README's quickstart block.

    python benchmarks/main_job.py                       # the offline form: --data-dir ../shared/data/glue
    python benchmarks/main_job.py --data-dir DIR        # GLUE elsewhere (DIR/STS-B/train.tsv, dev.tsv)

It runs the README's command (:data:`COMMAND`, plus ``--data-dir``) as a separate ``python -m elalora``
process (the CLI exactly as typed, not an import of it), times it from start to exit, and appends one
record to ``benchmarks/results/main_job.jsonl``: the command line, the last lines it printed, the final
metrics from the run's ``metrics.json``, the wall time, the machine and the versions.
``benchmarks/report.py`` renders the README's quickstart block from the last record.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, cpu_model  # noqa: E402

JSONL = RESULTS / "main_job.jsonl"
#: The README's main job (the Hub form; the offline form adds --data-dir).
COMMAND = ["elalora", "train", "--task", "stsb", "--method", "elalora", "--r", "8", "--epochs", "1",
           "--batch-size", "16", "--output-dir", "runs/stsb"]


def run(data_dir: str | None, threads: int | None) -> dict:
    argv = COMMAND[1:] + (["--data-dir", data_dir] if data_dir else [])
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "HF_DATASETS_OFFLINE": os.environ.get("HF_DATASETS_OFFLINE", "1")}
    with tempfile.TemporaryDirectory(prefix="main-job-") as tmp:
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "elalora", *argv], cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.time() - t0
        if r.returncode != 0:
            raise SystemExit(f"the main job failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
        metrics = json.loads((Path(tmp) / "runs" / "stsb" / "metrics.json").read_text())
        config = json.loads((Path(tmp) / "runs" / "stsb" / "config.json").read_text())
    out_lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    import torch

    return {"command": " ".join(shlex.quote(a) for a in ["elalora", *argv]), "wall_s": round(wall, 1),
            "last_lines": "\n".join(out_lines[-3:]), "metrics": metrics["final"],
            "rank_pattern_range": [min(metrics["rank_pattern"].values()), max(metrics["rank_pattern"].values())],
            "total_rank": metrics["total_rank"], "parameters": metrics.get("parameters"),
            "method_config": config.get("method_config"), "lr": config["training"]["lr"], "machine": cpu_model(),
            "threads": threads or torch.get_num_threads(), "torch": torch.__version__,
            "stderr_first_line": (r.stderr.splitlines() or [""])[0],
            "date": time.strftime("%Y-%m-%d %H:%M")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "glue"),
                    help="GLUE folder (default %(default)s); 'hub' to load STS-B from the Hugging Face Hub")
    ap.add_argument("--threads", type=int, default=None, help="recorded only: the job uses torch's choice")
    args = ap.parse_args(argv)
    rec = run(None if args.data_dir == "hub" else args.data_dir, args.threads)
    JSONL.parent.mkdir(parents=True, exist_ok=True)
    with open(JSONL, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps({k: rec[k] for k in ("command", "wall_s", "metrics")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
