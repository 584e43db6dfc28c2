"""Layer-contribution study: does a matrix that was given more rank matter more?

The ElaLoRA paper (Chang et al., 2025, §5 "analysis") switches off the adapters of the matrices that
ended with the highest ranks, and compares the drop in the task metric with switching off the ones
with the lowest ranks. We do the same, and add k random matrices as the control the paper lacks:

    drop(S) = metric(all adapters on) − metric(adapters of the matrices in S off)

for S = the k matrices with the highest final rank ("top"), the k with the lowest ("bottom") and
``random_draws`` sets of k drawn uniformly ("random"), with k = round(f · M) for each fraction f
of the M adapted matrices (at least 1). If rank follows importance, drop(top) > drop(random) >
drop(bottom). Metrics here are higher-is-better (accuracy, F1, MCC, Pearson, BLEU, ROUGE).

Ties at the cut (several matrices with the rank of the k-th) are broken by one seeded random order
of the matrices ("top" takes the matrices sorted by rank from one end, "bottom" from the other), so
the result is deterministic for a seed; the
result says how many of the k were chosen by the tie-break alone (``tied``). With uniform ranks
(plain LoRA) every choice is a tie-break, and "top" and "bottom" are two disjoint random sets.

Works on an elalora adapter (its layers' ``disabled`` switch) and on a PEFT LoRA model (PEFT's
per-layer ``enable_adapters``). The caller supplies ``evaluate`` (model -> metrics), so this
module does no I/O; ``elalora analyze`` (:mod:`elalora.cli.commands`) loads the run and writes the
table and the figure.

Imports: :mod:`elalora.model` (the adapter handle), :mod:`elalora.errors`.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from ..errors import RunError
from ..model import handle_of

__all__ = ["Switch", "adapter_switches", "choose_modules", "adapters_off", "layer_contribution",
           "format_contribution_table", "DEFAULT_FRACTIONS"]

DEFAULT_FRACTIONS = (0.1, 0.25)


@dataclass
class Switch:
    """One adapted matrix: its final rank and a function that turns its adapter on (True) or off."""

    rank: int
    set_enabled: Callable[[bool], None]
    is_enabled: Callable[[], bool]


def adapter_switches(model) -> dict[str, Switch]:
    """Module name -> :class:`Switch` for every adapted matrix of ``model`` (elalora or PEFT LoRA)."""
    try:
        handle = handle_of(model)
    except ValueError:  # no elalora handle: a PEFT model, or nothing
        handle = None
    if handle is not None:
        out = {}
        pattern = handle.rank_pattern()  # once, not per adapter
        for name, a in zip(handle.names, handle.adapters):
            if getattr(a, "merged", False):
                raise RunError(f"the adapter of {name!r} is merged into the base weights; analyze an unmerged model")

            def setter(on: bool, a=a) -> None:
                a.disabled = not on

            out[name] = Switch(int(pattern[name]), setter, lambda a=a: not a.disabled)
        return out
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover  (peft is a dependency)
        BaseTunerLayer = ()  # noqa: N806
    out = {}
    for name, mod in model.named_modules():
        if BaseTunerLayer and isinstance(mod, BaseTunerLayer) and getattr(mod, "r", None):
            if getattr(mod, "merged", False):
                raise RunError(f"the adapter of {name!r} is merged into the base weights; analyze an unmerged model")
            rank = sum(int(v) for v in mod.r.values())
            out[name.removeprefix("base_model.model.")] = Switch(
                rank, mod.enable_adapters, lambda mod=mod: not mod.disable_adapters)
    if not out:
        raise RunError("the model has no elalora or PEFT LoRA adapters to switch off")
    return out


def choose_modules(ranks: Mapping[str, int], k: int, group: str, seed: int, draw: int = 0) -> tuple[list[str], int]:
    """The ``k`` modules of ``group`` ("top", "bottom" or "random") and how many of them a tie decided.

    ``tied`` counts the chosen modules whose rank equals the rank at the cut while some module of
    that rank was left out: those were picked by the seeded tie-break order, not by their rank.
    """
    names = sorted(ranks)
    if not 1 <= k <= len(names):
        raise ValueError(f"k = {k} must be between 1 and the number of adapted matrices ({len(names)})")
    if group == "random":
        return sorted(random.Random(f"{seed}:random:{draw}").sample(names, k)), 0
    if group not in ("top", "bottom"):
        raise ValueError(f"group must be 'top', 'bottom' or 'random'; got {group!r}")
    order = names[:]
    random.Random(f"{seed}:ties").shuffle(order)  # one tie-break order for both ends
    order.sort(key=lambda n: ranks[n], reverse=True)  # stable: ties keep the shuffled order
    if group == "bottom":  # the same list from its other end, so that with uniform ranks top ∩ bottom = ∅
        order.reverse()
    chosen = order[:k]
    cut = ranks[chosen[-1]]
    left_out_at_cut = any(ranks[n] == cut for n in order[k:])
    tied = sum(ranks[n] == cut for n in chosen) if left_out_at_cut else 0
    return sorted(chosen), tied


@contextlib.contextmanager
def adapters_off(switches: Mapping[str, Switch], names: Sequence[str]) -> Iterator[None]:
    """Switch the adapters of ``names`` off for the ``with`` block; restores each one's state after."""
    before = {n: switches[n].is_enabled() for n in names}
    try:
        for n in names:
            switches[n].set_enabled(False)
        yield
    finally:
        for n, on in before.items():
            switches[n].set_enabled(on)


@dataclass
class Ablation:
    group: str
    fraction: float
    k: int
    draw: int
    modules: list[str]
    ranks: list[int]
    tied: int
    metrics: dict[str, float]
    drop: float


@dataclass
class Contribution:
    main_metric: str
    n_matrices: int
    total_rank: int
    baseline: dict[str, float]
    ablations: list[Ablation] = field(default_factory=list)
    seed: int = 0
    random_draws: int = 0

    def summary(self) -> list[dict]:
        """One row per (fraction, group): k, mean and std of the drop over draws, ranks switched off."""
        rows = []
        for f in sorted({a.fraction for a in self.ablations}):
            for g in ("top", "random", "bottom"):
                sel = [a for a in self.ablations if a.fraction == f and a.group == g]
                if not sel:
                    continue
                drops = [a.drop for a in sel]
                rows.append({"fraction": f, "group": g, "k": sel[0].k, "draws": len(sel),
                             "drop_mean": statistics.fmean(drops),
                             "drop_std": statistics.stdev(drops) if len(drops) > 1 else 0.0,
                             "rank_off_mean": statistics.fmean(sum(a.ranks) for a in sel),
                             "tied": max(a.tied for a in sel)})
        return rows

    def to_dict(self) -> dict:
        d = asdict(self)
        d["summary"] = self.summary()
        return d


def layer_contribution(model, evaluate: Callable[[object], Mapping[str, float]], main_metric: str, *,
                       fractions: Sequence[float] = DEFAULT_FRACTIONS, random_draws: int = 3, seed: int = 0,
                       ranks: Mapping[str, int] | None = None,
                       progress: Callable[[str], None] | None = None) -> Contribution:
    """Run the study on ``model`` (see the module docstring); ``evaluate(model)`` returns the metrics.

    ``ranks`` (module name -> rank, e.g. another run's final rank pattern) chooses the top and bottom
    sets instead of ``model``'s own ranks: applied to a uniform-rank LoRA run with an ElaLoRA run's
    ranks, it asks whether the matrices ElaLoRA favoured matter without ElaLoRA's rank on them. It
    must name exactly the adapted matrices of ``model``.

    ``1 + len(fractions) * (2 + random_draws)`` evaluations. The adapters are back on afterwards.
    """
    if random_draws < 0:
        raise ValueError(f"random_draws must be >= 0; got {random_draws}")
    switches = adapter_switches(model)
    if ranks is None:
        ranks = {n: s.rank for n, s in switches.items()}
    else:
        ranks = {str(n): int(r) for n, r in ranks.items()}
        missing, extra = sorted(set(switches) - set(ranks)), sorted(set(ranks) - set(switches))
        if missing or extra:
            raise RunError(f"the rank pattern does not name the model's adapted matrices: {len(missing)} missing "
                           f"(e.g. {missing[:2]}), {len(extra)} unknown (e.g. {extra[:2]}); take it from a run "
                           "of the same base model and target modules")
    m = len(ranks)
    ks = []
    for f in fractions:
        if not 0 < f <= 1:
            raise RunError(f"fractions must be in (0, 1]; got {f}")
        ks.append((float(f), min(m, max(1, round(f * m)))))
    total = 1 + len(ks) * (2 + random_draws)
    started = time.monotonic()

    def run(label: str, done: int) -> dict[str, float]:
        if progress is not None:
            took = time.monotonic() - started
            eta = "" if done == 1 else (f" ({took / (done - 1):.0f} s per evaluation so far, about "
                                        f"{took / (done - 1) * (total - done + 1) / 60:.1f} min left)")
            progress(f"[{done}/{total}] {label}{eta}")
        metrics = {k: float(v) for k, v in evaluate(model).items()}
        if main_metric not in metrics:
            raise RunError(f"the evaluation returned no {main_metric!r} (got {sorted(metrics)})")
        return metrics

    baseline = run("all adapters on", 1)
    res = Contribution(main_metric, m, sum(ranks.values()), baseline, seed=seed, random_draws=random_draws)
    done = 1
    for f, k in ks:
        plan = [("top", 0), ("bottom", 0)] + [("random", d) for d in range(random_draws)]
        for group, draw in plan:
            mods, tied = choose_modules(ranks, k, group, seed, draw)
            done += 1
            with adapters_off(switches, mods):
                metrics = run(f"{group} {k} of {m} off" + (f" (draw {draw + 1})" if group == "random" else ""), done)
            res.ablations.append(Ablation(group, f, k, draw, mods, [ranks[n] for n in mods], tied, metrics,
                                          baseline[main_metric] - metrics[main_metric]))
    return res


def format_contribution_table(res: Contribution) -> str:
    """A Markdown table of :meth:`Contribution.summary`."""
    base = res.baseline[res.main_metric]
    lines = [f"{res.main_metric} with every adapter on: {base:.4f} ({res.n_matrices} adapted matrices, "
             f"total rank {res.total_rank})", "",
             f"| switched off | k | ranks off (mean) | {res.main_metric} drop | chosen by tie-break |",
             "|---|---|---|---|---|"]
    for row in res.summary():
        spread = f" ± {row['drop_std']:.4f} ({row['draws']} draws)" if row["group"] == "random" else ""
        tie = "" if row["group"] == "random" else str(row["tied"])
        lines.append(f"| {row['group']} {row['fraction']:.0%} | {row['k']} | {row['rank_off_mean']:.1f} | "
                     f"{row['drop_mean']:+.4f}{spread} | {tie} |")
    return "\n".join(lines)
