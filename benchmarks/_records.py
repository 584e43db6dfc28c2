"""Benchmark records: the JSON-lines files under ``benchmarks/results/``, one record per finished cell.

Reading skips a torn last line (an interrupted write); appending is fsync'd and starts a fresh line after a
torn one, so an interrupted grid resumes where it stopped. :func:`carry_over` copies a protocol's records
into another protocol when every setting is identical; :func:`provenance` names the code and packages that
produced a record. Every benchmark reads and writes its records here; report.py renders the docs from them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def read_records(path: Path) -> list[dict]:
    """Every record of the JSON-lines file ``path`` (none if it does not exist), torn lines skipped."""
    path = Path(path)
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a torn last line of an interrupted write
    return out


def append_record(rec: dict, path: Path) -> None:
    """Append ``rec`` as one line of ``path`` and fsync it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = False
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"  # an interrupted earlier write: start a fresh line
    with open(path, "a") as f:
        f.write(("\n" if torn else "") + json.dumps(rec, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path, obj) -> None:
    """``obj`` as indented JSON, written atomically (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    tmp.replace(path)


def carry_over(records: list[dict], todo: list[tuple], task_steps: dict, *, source: str, protocol: str,
               want: Callable[[str, str, int], dict]) -> list[dict]:
    """Records of protocol ``source`` that are also cells ``(task, method, r, seed)`` of ``todo`` under
    ``protocol``, relabelled (``carried_from``).

    A cell carries over only when everything its command is made of is identical: (task, method, r, seed,
    steps) and every ``shared`` setting but the protocol's name; ``want(task, method, steps)`` gives the
    settings the cell would have under ``protocol``. Rerunning such a cell repeats it up to floating-point
    summation order (docs/results/protocol_history.md); the original date and argv stay in the record."""
    by_key = {}
    for rec in records:
        if rec.get("protocol") == source:
            by_key[(rec["task"], rec["method"], int(rec["r"]), int(rec["seed"]), int(rec.get("max_steps", -1)))] = rec
    out = []
    for task, method, r, seed in todo:
        rec = by_key.get((task, method, int(r), int(seed), int(task_steps[task])))
        if rec is None or {**rec.get("shared", {}), "protocol": protocol} != want(task, method, task_steps[task]):
            continue
        out.append({**rec, "protocol": protocol, "carried_from": source,
                    "shared": {**rec["shared"], "protocol": protocol}})
    return out


#: The packages whose versions can move a benchmark's numbers (recorded with every accuracy cell).
PROVENANCE_PACKAGES = ("elalora", "torch", "transformers", "peft", "accelerate", "bitsandbytes")


def provenance() -> dict:
    """Which code and which packages produced a record: the repository's commit (``None`` outside git), whether
    tracked files differed from it, and the installed versions of :data:`PROVENANCE_PACKAGES` (``None`` if
    absent). Cells run weeks apart, from worktrees and venvs, are then comparable by their records alone."""
    import subprocess
    from importlib import metadata

    root = Path(__file__).resolve().parents[1]

    def git(*args):
        try:
            out = subprocess.run(["git", "-C", str(root), *args], check=False, capture_output=True, text=True,
                                 timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    versions = {}
    for name in PROVENANCE_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None, "versions": versions}
