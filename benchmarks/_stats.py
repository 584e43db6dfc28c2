"""Statistics and tables of the benchmarks' records: Student-t intervals of paired differences, and the
Markdown tables that show them (a grid of mean ± sd, paired differences by seed, targets met).

A *cell* is one (task, arm, r) under one protocol; its records are one per seed. Two arms are compared
paired by seed: the difference per seed both have, its mean and the 95 % interval mean ± t(0.975, n−1)·sd/√n
(with 2 or 3 seeds wide by construction); "win"/"loss" only when the interval excludes 0, else "tie".
Tables name arms by :func:`arms.label` of their study.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

from arms import label


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (two-sided 95 % interval)."""
    from scipy import stats

    return float(stats.t.ppf(0.975, df))


def interval(d: list[float]) -> tuple[float, float, float]:
    """``(mean, low, high)`` of the paired differences ``d``: mean ± t(0.975, n−1)·sd/√n (NaN bounds for n 1)."""
    mu = statistics.mean(d)
    if len(d) < 2:
        return mu, math.nan, math.nan
    h = t_quantile(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return mu, mu - h, mu + h


def power_seeds(sd: float, effect: float = 1.0, cap: int = 30) -> int:
    """Seeds for a paired two-sided t-test at 5 % to find a true mean difference ``effect`` with 80 % power, given
    the sd of the paired differences (same unit): the smallest n ≥ 2 with
    ``t(0.975, n−1) + t(0.80, n−1) ≤ effect·√n / sd``; ``cap`` when even ``cap`` seeds fall short."""
    from scipy import stats

    for n in range(2, cap + 1):
        if stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.80, n - 1) <= effect * math.sqrt(n) / max(sd, 1e-12):
            return n
    return cap


def detectable_effect(sd: float, n: int) -> float:
    """The true mean difference that ``n`` paired seeds find with 80 % power at 5 % (two-sided), given the sd of
    the paired differences: (t(0.975, n−1) + t(0.80, n−1))·sd/√n, the inverse of :func:`power_seeds`."""
    from scipy import stats

    return float((stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.80, n - 1)) * sd / math.sqrt(n))


def paired_cell(d: list[float]) -> str:
    """``mean [95 % t-interval] verdict (n=…)`` of paired differences ``d`` (one per seed): mean ±
    t(0.975, n−1)·sd/√n; "win"/"loss" only when the interval excludes 0, else "tie"."""
    mu, lo, hi = interval(d)
    if len(d) < 2:
        return f"{mu:+.1f} (1 seed)"
    verdict = "win" if lo > 0 else "loss" if hi < 0 else "tie"
    return f"{mu:+.1f} [{lo:+.1f}, {hi:+.1f}] {verdict} (n={len(d)})"


def mean_sd(vals) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    vals = list(vals)
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _header(head: list[str]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]


def _task_col(t: str, metric_names: Mapping[str, str]) -> str:
    return f"{t.upper()} ({metric_names.get(t, '')})"


def grid_table(records: list[dict], *, tasks, methods, rs, seeds, steps, with_extra=True, protocol=None,
               not_run: dict[str, str] | None = None, extra: Mapping[int, list[str]] | None = None,
               metric_names: Mapping[str, str] | None = None, study: str = "glue") -> str:
    """The grid as a markdown table: mean ± sd per cell, parameters, average. Records of ``protocol`` (or, with
    none, of ``steps`` optimizer steps); ``extra`` {r: arms} adds budgets only some arms run (``with_extra``).
    ``not_run``: arms whose missing cells will not be run (arm -> why, for the note); they read "not run"
    instead of "pending"."""
    not_run, extra, metric_names = not_run or {}, extra or {}, metric_names or {}
    recs = {}
    for rec in records:
        if rec.get("protocol") != protocol:
            continue
        if protocol is None and int(rec.get("max_steps", -1)) != steps:
            continue
        recs.setdefault((rec["task"], rec["method"], int(rec["r"])), {})[int(rec["seed"])] = rec
    rows_r = sorted(set(rs) | (set(extra) if with_extra else set()))
    lines = _header(["r", "method", "trainable params (final active)"] + [_task_col(t, metric_names) for t in tasks]
                    + ["avg"])
    n_done = n_all = n_skip = 0
    for r in rows_r:
        for m in methods:
            if r not in rs and m not in extra.get(r, []):
                continue
            cells, means, params = [], [], None
            for t in tasks:
                got = recs.get((t, m, r), {})
                vals = [100 * got[s]["main"] for s in seeds if s in got]
                if m in not_run and not vals:
                    n_skip += len(seeds)
                    cells.append("not run")
                    continue
                n_all += len(seeds)
                n_done += len(vals)
                if params is None and got:
                    g0 = next(iter(got.values()))
                    params = (g0.get("trainable_params"), g0.get("active_params"))
                if not vals:
                    cells.append("pending")
                    continue
                mu, sd = mean_sd(vals)
                txt = f"{mu:.1f} ± {sd:.1f}"
                if len(vals) < len(seeds):
                    txt += f" ({len(vals)}/{len(seeds)} seeds)"
                else:
                    means.append(mu)
                cells.append(txt)
            avg = (f"{statistics.mean(means):.1f}" if len(means) == len(tasks)
                   else "–" if m in not_run else "pending")
            p = "pending" if params is None else (f"{params[0]:,}" + (f" ({params[1]:,})" if params[1] else ""))
            lines.append("| " + " | ".join([str(r), label(m, study), p] + cells + [avg]) + " |")
    budget = f"protocol {protocol}" if protocol else f"{steps} steps per cell"
    skipped = (f"; {n_skip} not run: " + "; ".join(f"{label(m, study)}: {why}" for m, why in not_run.items())
               if n_skip else "")
    note = (f"\n\n{n_done} of {n_all} cells done ({len(seeds)} seeds: {', '.join(map(str, seeds))}; "
            f"{budget}{skipped}). "
            "Scores ×100, mean ± std over the seeds done; `avg` only when every task has all seeds. Trainable "
            "params include the classifier head and, for ElaLoRA/ALoRA/AdaLoRA, every allocated rank slot; "
            "in parentheses the parameters of the ranks active at the end (seed "
            f"{seeds[0] if seeds else 0} run).")
    return "\n".join(lines) + note


def targets_table(records: list[dict], *, protocol: str, tasks, trivial: Mapping[str, tuple[str, float]],
                  targets: Mapping[str, float], method: str = "peft-lora", r: int = 8,
                  metric_names: Mapping[str, str] | None = None, study: str = "glue") -> str:
    """Does the protocol learn? ``method`` at ``r``: mean ± std over seeds against the trivial answer
    (``trivial[task] = (what, score)``) and the target."""
    metric_names = metric_names or {}
    lines = _header(["task", "trivial answer", f"{label(method, study)} r = {r}", "seeds", "target", "met?"])
    for t in tasks:
        vals = [100 * rec["main"] for rec in records if rec.get("protocol") == protocol and rec["task"] == t
                and rec["method"] == method and int(rec["r"]) == r]
        name, triv = trivial[t]
        col = f"{t.upper()} ({metric_names.get(t, '')})"
        if not vals:
            lines.append(f"| {col} | {triv:.1f} ({name}) | pending | 0 | {targets[t]:.0f} | |")
            continue
        mu, sd = mean_sd(vals)
        met = "yes" if mu >= targets[t] else "no"
        if len(vals) < 3:
            met += " (so far)"
        lines.append(f"| {col} | {triv:.1f} ({name}) | {mu:.1f} ± {sd:.1f} | {len(vals)} | {targets[t]:.0f} | {met} |")
    return "\n".join(lines)


def paired_table(records: list[dict], *, protocol: str, tasks, method: str = "elalora",
                 baselines=("peft-lora", "peft-lora-eva", "peft-adalora", "adalora"), rs=(2, 8),
                 cross=((2, "peft-adalora", 4),), metric_names: Mapping[str, str] | None = None,
                 study: str = "glue") -> str:
    """``method`` minus each baseline, per task and budget, paired by seed: mean and 95 % t-interval.

    Rows: every baseline at the same budget r, then the ``cross`` comparisons ``(r, baseline, r_b)``:
    ``method`` at r against the baseline at r_b (the ElaLoRA paper's claim that ElaLoRA at r 2 beats
    AdaLoRA at r 4). A pair is a seed that both cells have (:func:`paired_cell`)."""
    metric_names = metric_names or {}
    recs = {}
    for rec in records:
        if rec.get("protocol") == protocol:
            recs.setdefault((rec["task"], rec["method"], int(rec["r"])), {})[int(rec["seed"])] = 100 * rec["main"]
    lines = _header(["r", f"{label(method, study)} minus"] + [_task_col(t, metric_names) for t in tasks])
    rows = [row for r in rs for row in [(r, b, r) for b in baselines] + [c for c in cross if c[0] == r]]
    for r, b, rb in rows:
        cells = []
        for t in tasks:
            x, y = recs.get((t, method, r), {}), recs.get((t, b, rb), {})
            seeds = sorted(set(x) & set(y))
            cells.append(paired_cell([x[s] - y[s] for s in seeds]) if seeds else "pending")
        name = label(b, study) + ("" if rb == r else f" at r = {rb}")
        lines.append("| " + " | ".join([str(r), name] + cells) + " |")
    return "\n".join(lines) + ("\n\nScores ×100. Paired by seed: mean difference [95 % t-interval] over the n seeds "
                               "both cells have; *tie* when the interval contains 0.")
