"""Allocation scaling: time of one importance-score update and of one allocation round, ours vs PEFT.

    python benchmarks/alloc_scaling.py --threads 1          # full run (about 1 min on this 2-core CPU)
    python benchmarks/alloc_scaling.py --quick              # smoke test (small sizes, few repeats)

Synthetic adapter layouts, without the base weights (the base ``nn.Linear`` layers live on the meta
device; only the adapter parameters, their gradients and the score state are real):

* ``deberta-base``: 72 matrices in 12 layers (q, k, v, attention-out 768×768, intermediate 768→3072,
  output 3072→768), budget r = 10;
* ``llama-7b``: 224 matrices in 32 layers (q, k, v, o 4096×4096; gate, up 4096→11008; down
  11008→4096), budget r = 8;
* a scaling series of N identical 1024×1024 matrices (N = 72 … 3584), r = 8.

Every method sees the same tensor shapes: rank slots ``c = ceil(1.5 r)`` per matrix (PEFT AdaLoRA
``init_r = c, target_r = r``; our AdaLoRA ``init_r = c, r``; our ElaLoRA ``r`` active ranks in
``max_rank = c`` slots). A separate row gives our ElaLoRA at its default capacity ``2 r``.

Measured, interleaved round-robin over the variants, medians over ``--repeats``:

* *score update*: ours ``ImportanceTracker.update()``; PEFT ``RankAllocator.update_and_allocate`` on a
  plain step (= ``update_ipt`` + the budget formula);
* *round*: ours ``Allocator.on_step`` on a round step (scores → selection → rank changes; on a plain
  step ``on_step`` does nothing); PEFT ``update_and_allocate`` on a mask step minus a plain step
  (and, measured inside the same call, ``mask_to_budget`` alone).

Gradients are random (fixed), parameters N(0, 0.02²) on active slots; flush-to-zero is on so that
denormals cannot distort either side.

Nothing got slower? ``--compare LABEL=PATH`` (repeatable; default: the committed record
``benchmarks/results/alloc_scaling.json``, read before this run overwrites it) puts a previous record's
medians next to this run's. To time older code on the same machine, run this script with that code's
``src`` first on ``PYTHONPATH`` (e.g. a ``git worktree`` of the older commit; only public API is used)
and ``--out`` elsewhere, then pass its JSON to ``--compare``. No code is loaded any other way.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS, command_line, iqr, loadavg, machine_info, machine_md, md_table, median,  # noqa: E402
                     write_results)

from elalora import AdaLoRAConfig, ElaLoRAConfig  # noqa: E402
from elalora.allocation.adalora import AdaLoRAAllocator  # noqa: E402
from elalora.allocation.elalora import ElaLoRAAllocator  # noqa: E402
from elalora.importance import ImportanceTracker  # noqa: E402
from elalora.layers import SVDAdapter  # noqa: E402


# ----------------------------------------------------------------------------------- layouts
def layout(name: str, n: int | None = None) -> tuple[list[tuple[str, int, int]], int]:
    """``([(module name, d_in, d_out)], r)``."""
    if name == "deberta-base":
        out = []
        for layer in range(12):
            for m in ("query", "key", "value", "attention.output.dense"):
                out.append((f"layer.{layer}.{m}", 768, 768))
            out.append((f"layer.{layer}.intermediate.dense", 768, 3072))
            out.append((f"layer.{layer}.output.dense", 3072, 768))
        return out, 10
    if name == "llama-7b":
        out = []
        for layer in range(32):
            for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out.append((f"layers.{layer}.{m}", 4096, 4096))
            out.append((f"layers.{layer}.gate_proj", 4096, 11008))
            out.append((f"layers.{layer}.up_proj", 4096, 11008))
            out.append((f"layers.{layer}.down_proj", 11008, 4096))
        return out, 8
    if name == "uniform":
        return [(f"m.{i}", 1024, 1024) for i in range(n)], 8
    raise ValueError(name)


def our_adapters(shapes, active: int, capacity: int, seed: int) -> list[SVDAdapter]:
    """SVD adapters at the real shapes around meta-device base layers (no base weights allocated)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _, din, dout in shapes:
        a = SVDAdapter(nn.Linear(din, dout, bias=False, device="meta"), r=active, capacity=capacity, lora_alpha=16.0)
        mask = torch.zeros(capacity)
        mask[:active] = 1
        a.lora_P = nn.Parameter(torch.randn(dout, capacity, generator=g).mul_(0.02) * mask)
        a.lora_lambda = nn.Parameter(torch.randn(capacity, generator=g).mul_(0.1) * mask)
        a.lora_Q = nn.Parameter(torch.randn(capacity, din, generator=g).mul_(0.02) * mask[:, None])
        a.active = mask.bool()
        a.lora_P.grad = torch.randn(dout, capacity, generator=g) * mask
        a.lora_lambda.grad = torch.randn(capacity, generator=g) * mask
        a.lora_Q.grad = torch.randn(capacity, din, generator=g) * mask[:, None]
        out.append(a)
    return out


class _PeftLeaf(nn.Module):
    """What PEFT's RankAllocator reads of an AdaLoRA layer: lora_A (c×d_in), lora_E (c×1), lora_B (d_out×c)."""

    def __init__(self, din, dout, c, g):
        super().__init__()
        self.lora_A = nn.ParameterDict({"default": nn.Parameter(torch.randn(c, din, generator=g).mul_(0.02))})
        self.lora_E = nn.ParameterDict({"default": nn.Parameter(torch.randn(c, 1, generator=g).mul_(0.1))})
        self.lora_B = nn.ParameterDict({"default": nn.Parameter(torch.randn(dout, c, generator=g).mul_(0.02))})


def peft_tree(shapes, c: int, target_r: int, total: int, tfinal: int, delta_t: int, seed: int):
    from peft.tuners.adalora.layer import RankAllocator

    g = torch.Generator().manual_seed(seed)
    root = nn.Module()
    root.layers = nn.ModuleDict({name.replace(".", "_"): _PeftLeaf(din, dout, c, g) for name, din, dout in shapes})
    for p in root.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    cfg = SimpleNamespace(beta1=0.85, beta2=0.85, target_r=target_r, tinit=0, tfinal=tfinal, total_step=total,
                          deltaT=delta_t)
    return root, RankAllocator(root, cfg, "default")


# ----------------------------------------------------------------------------------- timing
def _t(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


class _Timed:
    """Wraps a callable and records the duration of each call (to split a round into its parts)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *a, **k):
        t = time.perf_counter()
        try:
            return self.fn(*a, **k)
        finally:
            self.calls.append(time.perf_counter() - t)


class OursVariant:
    """Our tracker + allocation policy; plain steps at odd t, round steps at even t."""

    def __init__(self, label, adapters, allocator):
        self.label, self.adapters, self.alloc = label, adapters, allocator
        self.tracker = ImportanceTracker(adapters)
        self.t = 1
        self.rec = {"update": [], "plain_on_step": [], "round": [], "rank_scores": [], "select": [], "apply": [],
                    "guard": []}

    def warmup(self):
        self.tracker.update()
        self.tracker.rank_scores()

    def run_pair(self):
        d, _ = _t(self.tracker.update)
        self.rec["update"].append(d)
        # The non-finite-gradient guard inside update() (one fused norm per gradient; PEFT has none),
        # timed on its own so the table can show what the safety costs.
        grads = [p.grad for p in self.tracker._params if p.grad is not None]
        d, _ = _t(lambda: self.tracker._grads_finite(grads))
        self.rec["guard"].append(d)
        d, ev = _t(lambda: self.alloc.on_step(self.t, None, importance=self.tracker))
        assert not ev
        self.rec["plain_on_step"].append(d)
        self.t += 1
        d, _ = _t(self.tracker.update)
        self.rec["update"].append(d)
        mod = sys.modules[type(self.alloc).__module__]
        name_sel = "select_prune_grow" if hasattr(mod, "select_prune_grow") else "select_to_budget"
        # the score read: round_table (scores and masks in one transfer) where the tracker has it
        read = "round_table" if hasattr(self.tracker, "round_table") else "rank_scores"
        rs, sel = _Timed(getattr(self.tracker, read)), _Timed(getattr(mod, name_sel))
        app = _Timed(mod.apply_rank_changes)
        setattr(self.tracker, read, rs)  # instance attribute shadows the method for this call only
        setattr(mod, name_sel, sel)
        mod.apply_rank_changes = app
        try:
            d, ev = _t(lambda: self.alloc.on_step(self.t, None, importance=self.tracker))
        finally:
            setattr(mod, name_sel, sel.fn)
            mod.apply_rank_changes = app.fn
            delattr(self.tracker, read)
        assert ev, f"{self.label}: no rank change at round step {self.t}"
        self.rec["round"].append(d)
        self.rec["rank_scores"].append(sum(rs.calls))
        self.rec["select"].append(sum(sel.calls))
        self.rec["apply"].append(sum(app.calls))
        self.t += 1

    def summary(self):
        r = {k: median(v) * 1e3 for k, v in self.rec.items()}
        r["update_iqr"] = [x * 1e3 for x in iqr(self.rec["update"])]
        r["round_iqr"] = [x * 1e3 for x in iqr(self.rec["round"])]
        r["round_extra"] = r["round"] - r["plain_on_step"]
        r["state_bytes"] = self.tracker.state_bytes()
        r["adapter_bytes"] = sum(p.numel() * p.element_size()
                                 for a in self.adapters for _, p, _ in a.slot_parameters())
        r["n"] = len(self.rec["update"])
        return r


class PeftVariant:
    def __init__(self, root, ra):
        self.root, self.ra, self.t = root, ra, 1
        self.rec = {"plain": [], "mask": [], "mask_to_budget": []}
        self.label = "peft_adalora"

    def warmup(self):
        self.ra.update_ipt(self.root)

    def run_pair(self):
        d, _ = _t(lambda: self.ra.update_and_allocate(self.root, self.t))
        self.rec["plain"].append(d)
        self.t += 1
        m2b = _Timed(self.ra.mask_to_budget)
        self.ra.mask_to_budget = m2b
        try:
            d, (_, pattern) = _t(lambda: self.ra.update_and_allocate(self.root, self.t))
        finally:
            del self.ra.mask_to_budget
        assert pattern is not None
        self.rec["mask"].append(d)
        self.rec["mask_to_budget"].append(sum(m2b.calls))
        self.t += 1

    def summary(self):
        r = {k: median(v) * 1e3 for k, v in self.rec.items()}
        r["update"] = r["plain"]
        r["update_iqr"] = [x * 1e3 for x in iqr(self.rec["plain"])]
        r["round_extra"] = r["mask"] - r["plain"]
        params = [p for n, p in self.root.named_parameters()]
        r["adapter_bytes"] = sum(p.numel() * p.element_size() for p in params)
        r["state_bytes"] = sum(t.numel() * t.element_size()
                               for d in (self.ra.ipt, self.ra.exp_avg_ipt, self.ra.exp_avg_unc)
                               for t in d.values())
        r["n"] = len(self.rec["plain"])
        return r


def measure(shapes, r, *, repeats, seed=0, ours_adalora=True, ela_2r=True, log=print) -> dict:
    c = int(math.ceil(1.5 * r))
    total, tfinal, dt = 10 * repeats + 400, 10, 2
    names = [s[0] for s in shapes]
    variants = []
    ela_ads = our_adapters(shapes, r, c, seed)
    ela = ElaLoRAAllocator(names, ela_ads, ElaLoRAConfig(r=r, form="svd", b=4, k=2, max_rank=c, tinit=0, tfinal=tfinal,
                                                          delta_t=dt, use_scheduler=False, total_steps=10**6))
    variants.append(OursVariant("ours_elalora", ela_ads, ela))
    if ela_2r:
        ads2 = our_adapters(shapes, r, 2 * r, seed + 1)
        a2 = ElaLoRAAllocator(names, ads2, ElaLoRAConfig(r=r, form="svd", b=4, k=2, tinit=0, tfinal=tfinal, delta_t=dt,
                                                         use_scheduler=False, total_steps=10**6))
        variants.append(OursVariant("ours_elalora_cap2r", ads2, a2))
    if ours_adalora:
        ada_ads = our_adapters(shapes, c, c, seed + 2)
        ada = AdaLoRAAllocator(names, ada_ads, AdaLoRAConfig(r=r, init_r=c, tinit=0, tfinal=tfinal, delta_t=dt,
                                                             total_steps=total))
        variants.append(OursVariant("ours_adalora", ada_ads, ada))
    root, ra = peft_tree(shapes, c, r, total, tfinal, dt, seed + 3)
    variants.append(PeftVariant(root, ra))
    for v in variants:
        v.warmup()
    for i in range(repeats):
        for v in (variants if i % 2 == 0 else variants[::-1]):
            v.run_pair()
    out = {v.label: v.summary() for v in variants}
    out["layout"] = {"matrices": len(shapes), "r": r, "slots": c,
                     "adapter_elements_per_copy": sum(c * (din + dout + 1) for _, din, dout in shapes)}
    peft = out["peft_adalora"]
    for k in ("ours_elalora", "ours_elalora_cap2r", "ours_adalora"):
        if k in out:
            out[k]["update_vs_peft"] = out[k]["update"] / peft["update"]
    log(f"  {len(shapes)} matrices: " + ", ".join(
        f"{k} upd {v['update']:.1f} ms" + (f" round {v['round_extra']:.2f} ms" if "round_extra" in v else "")
        for k, v in out.items() if isinstance(v, dict) and "update" in v))
    del variants, root, ra
    gc.collect()
    return out


# ----------------------------------------------------------------------------------- report
def fit_line(xs, ys):
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys) or 1e-30
    return a, b, 1 - ss_res / ss_tot


def render(res: dict) -> str:
    f = lambda x: f"{x:.2f}" if x < 10 else f"{x:.1f}"  # noqa: E731
    lines = []
    rows = []
    for lay in ("deberta-base", "llama-7b"):
        if lay not in res["layouts"]:
            continue
        L = res["layouts"][lay]
        p = L["peft_adalora"]
        for k, label in (("ours_elalora", "ours ElaLoRA (r active of c slots)"),
                         ("ours_elalora_cap2r", "ours ElaLoRA, capacity 2r"),
                         ("ours_adalora", "ours AdaLoRA (c → r)"), ("peft_adalora", "PEFT AdaLoRA (c → r)")):
            if k not in L:
                continue
            v = L[k]
            if k == "peft_adalora":
                rnd = f"{f(v['round_extra'])} (mask_to_budget alone {f(v['mask_to_budget'])})"
            else:
                rnd = (f"{f(v['round'])} (scores {f(v['rank_scores'])}, select {f(v['select'])}, "
                       f"apply {f(v['apply'])})")
            ratio = f"{v['update'] / p['update']:.2f}"
            sb = f"{v['state_bytes'] / v['adapter_bytes']:.2f}" if "state_bytes" in v else "–"
            slots = L["layout"]["slots"] if k != "ours_elalora_cap2r" else 2 * L["layout"]["r"]
            upd = f(v["update"]) + (f" (guard {f(v['guard'])})" if "guard" in v else "")
            rows.append([lay, L["layout"]["matrices"], slots, label, upd, ratio, rnd, sb])
    lines.append(md_table(["layout", "matrices", "slots/matrix", "variant",
                           "score update (ms) (of which non-finite guard)",
                           "update ÷ PEFT", "round extra (ms)", "state B / adapter B"], rows))
    sc = res.get("scaling")
    if sc:
        lines.append("")
        lines.append(f"Scaling: N identical 1024×1024 matrices, r 8, {sc['points'][0]['layout']['slots']} slots each.")
        lines.append("")
        rows = []
        for pt in sc["points"]:
            o, p = pt["ours_elalora"], pt["peft_adalora"]
            rows.append([pt["layout"]["matrices"], f(o["update"]), f(p["update"]), f"{o['update'] / p['update']:.2f}",
                         f(o["round"]), f"{f(o['select'])} / {f(o['apply'])}", f(p["round_extra"]),
                         f(p["mask_to_budget"])])
        lines.append(md_table(["matrices", "ours update (ms)", "PEFT update (ms)", "ours ÷ PEFT", "ours round (ms)",
                               "ours select / apply (ms)", "PEFT round extra (ms)", "PEFT mask_to_budget (ms)"], rows))
        lines.append("")
        for k, v in sc["fits"].items():
            lines.append(f"- linear fit `{k}`: {v['per_matrix_us']:.1f} µs per matrix + {v['intercept_ms']:.2f} ms, "
                         f"R² = {v['r2']:.3f}; time({v['n_max']}) / time({v['n_min']}) = {v['ratio']:.1f} "
                         f"(matrices ×{v['n_max'] / v['n_min']:.0f})")
    for label, prev in res.get("compared", {}).items():
        lines += ["", f"Against {label} (`{prev['path']}`, {prev['when']}): ours ÷ PEFT of the same run (PEFT's "
                  "code did not change, so the ratio cancels machine load), and the medians.", ""]
        rows = []
        for lay, L in res["layouts"].items():
            P = prev["layouts"].get(lay, {})
            for k in ("ours_elalora", "ours_elalora_cap2r", "ours_adalora"):
                if k in L and k in P:
                    v, w = L[k], P[k]
                    rows.append([lay, k, f"{w['update_vs_peft']:.2f} → {v['update_vs_peft']:.2f}",
                                 f"{f(w['update'])} → {f(v['update'])}", f"{f(w['round'])} → {f(v['round'])}",
                                 f"{w['round'] / P['peft_adalora']['mask']:.3f} → "
                                 f"{v['round'] / L['peft_adalora']['mask']:.3f}"])
        pts_prev = {p["layout"]["matrices"]: p for p in (prev.get("scaling") or {}).get("points", [])}
        for pt in (res.get("scaling") or {}).get("points", []):
            n = pt["layout"]["matrices"]
            if n in pts_prev:
                v, w = pt["ours_elalora"], pts_prev[n]["ours_elalora"]
                pv, pw = pt["peft_adalora"], pts_prev[n]["peft_adalora"]
                rows.append([f"uniform ×{n}", "ours_elalora", f"{w['update'] / pw['update']:.2f} → "
                             f"{v['update'] / pv['update']:.2f}", f"{f(w['update'])} → {f(v['update'])}",
                             f"{f(w['round'])} → {f(v['round'])}",
                             f"{w['round'] / pw['mask']:.3f} → {v['round'] / pv['mask']:.3f}"])
        lines.append(md_table(["layout", "variant", "update ÷ PEFT update", "update (ms)", "round (ms)",
                               "round ÷ PEFT mask step"], rows))
    return "\n".join(lines)


def load_record(spec: str) -> tuple[str, dict]:
    """``LABEL=PATH`` (or a bare path) of a previous results JSON: ``(label, record)``."""
    label, _, path = spec.rpartition("=")
    rec = json.loads(Path(path).read_text())
    m = rec.get("machine", {})
    return label or Path(path).stem, {"path": path, "when": m.get("when", m.get("date", "?")),
                                      "layouts": rec.get("layouts", {}), "scaling": rec.get("scaling")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15, help="plain+round step pairs per variant (named layouts)")
    ap.add_argument("--scaling-repeats", type=int, default=7)
    ap.add_argument("--scaling", default="72,224,448,896,1792,3584", help="matrix counts of the scaling series")
    ap.add_argument("--layouts", default="deberta-base,llama-7b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compare", action="append", default=None, metavar="LABEL=PATH",
                    help="a previous results JSON to put side by side (default: the committed record)")
    ap.add_argument("--quick", action="store_true", help="smoke test: small sizes, 3 repeats, no file output")
    ap.add_argument("--out", default=str(RESULTS / "alloc_scaling"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.set_grad_enabled(False)
    info = machine_info(torch.get_num_threads())
    specs = args.compare if args.compare is not None else [f"committed record={RESULTS / 'alloc_scaling.json'}"]
    compared = dict(load_record(x) for x in specs if Path(x.rpartition("=")[2]).is_file())
    layouts = [x for x in args.layouts.split(",") if x]
    counts = [int(x) for x in args.scaling.split(",") if x]
    reps, sreps = args.repeats, args.scaling_repeats
    if args.quick:
        layouts, counts, reps, sreps = ["deberta-base"], [72, 144], 3, 3
    res = {"command": command_line(), "machine": info, "layouts": {}, "scaling": None,
           "settings": {"repeats": reps, "scaling_repeats": sreps, "threads": args.threads,
                        "elalora": "b=4, k=2, Δt=2 (round every other step), no b_t decay",
                        "adalora": "init_r=c, target_r=r, tinit=0, tfinal=10, Δt=2, T=400+10·repeats"}}
    t0 = time.time()
    for lay in layouts:
        shapes, r = layout(lay)
        print(f"[{time.time() - t0:.0f}s] layout {lay} (load {loadavg()})", flush=True)
        res["layouts"][lay] = measure(shapes, r, repeats=reps)
    if counts:
        pts = []
        for n in counts:
            shapes, r = layout("uniform", n)
            print(f"[{time.time() - t0:.0f}s] scaling N={n} (load {loadavg()})", flush=True)
            pts.append(measure(shapes, r, repeats=sreps, ours_adalora=False, ela_2r=False))
        fits = {}
        xs = [p["layout"]["matrices"] for p in pts]
        for key, get in (("ours update", lambda p: p["ours_elalora"]["update"]),
                         ("PEFT update", lambda p: p["peft_adalora"]["update"]),
                         ("ours round", lambda p: p["ours_elalora"]["round"]),
                         ("PEFT round extra", lambda p: p["peft_adalora"]["round_extra"]),
                         ("PEFT mask_to_budget", lambda p: p["peft_adalora"]["mask_to_budget"])):
            ys = [get(p) for p in pts]
            a, b, r2 = fit_line(xs, ys)
            fits[key] = {"intercept_ms": a, "per_matrix_us": b * 1e3, "r2": r2, "n_min": xs[0], "n_max": xs[-1],
                         "ratio": ys[-1] / ys[0] if ys[0] > 0 else float("nan")}
        res["scaling"] = {"shape": "1024x1024", "points": pts, "fits": fits}
    res["compared"] = compared
    info["loadavg_end"] = loadavg()
    res["wall_s"] = round(time.time() - t0, 1)
    md = (f"# Allocation scaling\n\nCommand: `{res['command']}`\n\n{machine_md(info)}\n\n"
          f"Medians over {reps} plain+round step pairs per variant ({sreps} for the scaling series), variants "
          f"interleaved round-robin. Times in ms.\n\n" + render(res) + "\n")
    write_results(args.out, res, md, quick=args.quick)


if __name__ == "__main__":
    main()
