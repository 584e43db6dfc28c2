"""Diagnostics behind the orthogonal-regulariser finding (docs/results/planted_rank.md, "Why the SVD-form
methods lost").

Trains our ElaLoRA on the tiny concentrated planted-rank cell (seed 0) with the task loss and γ·R as
two separate backward passes, and prints every ``--every`` steps: the norms of the task and of the
regulariser gradients on P, Q (and λ), the importance mass ``Σ|w·g|`` each contributes, the fraction
of P/Q entries where the regulariser's gradient is the larger one, mean |λ| and the mean row norm of
Q; at the end the relative held-out loss (REL) and the final ranks of the planted matrices.

Variants: ``--gamma``; ``--reg sq`` (the papers' squared norms instead of PEFT's unsquared ones);
``--init orth`` (orthonormal P, Q at the start instead of N(0, 0.02²)); ``--imp_task`` (scores from
the task gradient only); ``--rounds 0`` (no allocation round); ``--lr``.

    nice -n 10 python benchmarks/planted_rank_diag.py --gamma 0.1 --rounds 0 --every 20
"""
import copy
import json
import sys

import torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import planted_rank as pr
import elalora
torch.set_num_threads(1)
import argparse
ap = argparse.ArgumentParser()
ap.add_argument("--gamma", type=float, default=0.1)
ap.add_argument("--steps", type=int, default=120)
ap.add_argument("--init", default="normal")   # normal | orth
ap.add_argument("--alpha", type=float, default=None)
ap.add_argument("--rounds", type=int, default=1)
ap.add_argument("--every", type=int, default=20)
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--reg", default="ours")
ap.add_argument("--imp_task", action="store_true")  # ours | sq
a = ap.parse_args()
tok = pr.tokenizer()
train_text = pr.sentences("train")
dev = pr.sentences("dev", 128)
base = pr.base_model("tiny", tok.vocab_size)
names = pr.target_names(base)
n = len(names)
ranks = pr.planted_ranks("concentrated", n, 2)
teacher = pr.Distill(copy.deepcopy(base))
pr.plant(teacher.bert, names, ranks, 0)
teacher.eval()
train = pr.batches(tok, train_text, 16, 32, 0, a.steps)
ev = pr.batches(tok, dev, 32, 32, 0, 4)
model = pr.Distill(copy.deepcopy(base))
kw = {} if a.alpha is None else {"lora_alpha": a.alpha}
cfg = elalora.ElaLoRAConfig(r=2, form="svd", max_rank=max(ranks), target_modules=["bert."+x for x in names],
        total_steps=a.steps, delta_t=0.05, orth_reg_weight=0.0, tinit=(0.1 if a.rounds else a.steps-2),
        tfinal=(0.2 if a.rounds else 1), seed=0, **kw)
h = elalora.get_model(model, cfg)
if a.init == "orth":
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for ad in h.adapters:
            r = ad.rank
            q, _ = torch.linalg.qr(torch.randn(ad.in_features, r, generator=g))
            ad.lora_Q[:r] = q.t()
            p, _ = torch.linalg.qr(torch.randn(ad.out_features, r, generator=g))
            ad.lora_P[:, :r] = p
start = pr.heldout_loss(model, teacher, ev)
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1 - t / a.steps))
PQ = [p for ad in h.adapters for p in (ad.lora_P, ad.lora_Q)]
LAM = [ad.lora_lambda for ad in h.adapters]
def reg():
    if a.reg == "ours":
        return h.orthogonal_loss()
    svd = h.adapters
    return torch.stack([ad.orthogonality_penalty()**2 for ad in svd]).sum() / (2*len(svd))
for t, b in enumerate(train):
    with torch.no_grad():
        tgt = teacher(**b).last_hidden_state
    L = model(**b, target=tgt)["loss"]
    gt = torch.autograd.grad(L, params, retain_graph=True, allow_unused=True)
    gt = [torch.zeros_like(p) if g is None else g for p, g in zip(params, gt)]
    if a.gamma:
        gr = torch.autograd.grad(a.gamma * reg(), params, allow_unused=True)
        gr = [torch.zeros_like(p) if g is None else g for p, g in zip(params, gr)]
    else:
        gr = [torch.zeros_like(p) for p in params]
    if t % a.every == 0 or t == a.steps - 1:
        idx = {id(p): i for i, p in enumerate(params)}
        def agg(ps, gs): return sum(float(gs[idx[id(p)]].norm()**2) for p in ps)**.5
        def imp(ps, gs): return sum(float((p*gs[idx[id(p)]]).abs().sum()) for p in ps)
        # elementwise: fraction of PQ entries where |reg grad| > |task grad|
        dom = (sum(int((gr[idx[id(p)]].abs() > gt[idx[id(p)]].abs()).logical_and(p != 0).sum()) for p in PQ)
               / sum(int((p!=0).sum()) for p in PQ))
        lam = torch.cat([ad.lora_lambda[ad.active] for ad in h.adapters]).abs().mean()
        qn = torch.cat([ad.lora_Q[ad.active].norm(dim=1) for ad in h.adapters]).mean()
        # alignment of the planted matrices' learnt dW with the planted dW
        rel = []
        for i, k in enumerate(ranks):
            if k:
                Wt = teacher.bert.get_submodule(names[i]).weight - base.get_submodule(names[i]).weight
                dW = h.adapters[i].delta_weight().detach()
                rel.append(float((dW - Wt).norm() / Wt.norm()))
        print(json.dumps({"t": t, "loss_rel": float(L)/start, "g_task_PQ": agg(PQ, gt), "g_reg_PQ": agg(PQ, gr),
              "g_task_lam": agg(LAM, gt), "imp_task_PQ": imp(PQ, gt), "imp_reg_PQ": imp(PQ, gr),
              "imp_task_lam": imp(LAM, gt), "reg_dominates_PQ": round(dom, 3), "lam": float(lam), "qnorm": float(qn),
              "planted_relerr": [round(x, 3) for x in rel],
              "ranks_planted": [h.adapters[i].rank for i,k in enumerate(ranks) if k]}), flush=True)
    for p, g1, g2 in zip(params, gt, gr):
        p.grad = g1 + g2
    opt.step()
    if a.imp_task:
        for p, g1 in zip(params, gt):
            p.grad = g1
    h.step(opt, step=t)
    sch.step()
    opt.zero_grad(set_to_none=True)
end = pr.heldout_loss(model, teacher, ev)
print("REL", end/start, "planted ranks", [h.adapters[i].rank for i,k in enumerate(ranks) if k],
      "total on planted", sum(h.adapters[i].rank for i,k in enumerate(ranks) if k))
