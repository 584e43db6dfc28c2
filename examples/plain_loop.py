"""ElaLoRA in a plain PyTorch loop: all-MiniLM-L6-v2 on GLUE STS-B (sentence similarity, dev Pearson).
The loop is the documentation.

    python examples/plain_loop.py --data-dir /path/to/glue          # folder holding STS-B/train.tsv, dev.tsv
    python examples/plain_loop.py                                   # STS-B from the Hugging Face Hub

Expected: 150 steps take about 1 minute on 2 idle CPU cores (several times longer on a busy machine);
the dev Pearson goes from about 0 before training to about 0.8 after it. A line every 10 steps shows the
loss and the time left. Mean pooling: the classifier reads the mean of the last hidden states, which is
what this sentence-transformers checkpoint was trained for (its pooler over [CLS] never was).
"""
import argparse
import json
import math
import pathlib
import sys
import time

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

import elalora
from elalora.heads import use_mean_pooling
from elalora.recipe.loading import default_model
from elalora.tasks import TextClassificationCollator, compute_metrics, load_task_data

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--data-dir", default=None, help="folder holding STS-B/train.tsv and dev.tsv (default: the Hub)")
ap.add_argument("--model", default=None, help="a BERT-like model folder (default: all-MiniLM-L6-v2)")
ap.add_argument("--steps", type=int, default=150)
ap.add_argument("--r", type=int, default=8)
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--batch-size", type=int, default=16)
ap.add_argument("--max-train", type=int, default=None, help="train on the first N examples (tests)")
ap.add_argument("--max-eval", type=int, default=None, help="evaluate on the first N dev examples (tests)")
ap.add_argument("--out", default="runs/stsb-loop")
args = ap.parse_args()

try:
    train, dev, spec = load_task_data("stsb", args.data_dir)
except elalora.ElaLoRAError as e:  # no data: one line saying where to get it, no traceback
    sys.exit(f"plain_loop.py: {e}. GLUE STS-B: https://gluebenchmark.com/tasks or the Hugging Face dataset "
             "nyu-mll/glue (config stsb)")
train, dev = train[: args.max_train], dev[: args.max_eval]
torch.manual_seed(0)
path = args.model or default_model("regression")[0]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, problem_type="regression")
use_mean_pooling(model)                                      # before the adapters wrap the model
collate = TextClassificationCollator(tok, 128, spec.kind)
loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=collate)


def dev_pearson() -> float:
    model.eval()
    preds, labels = [], []
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(dev, batch_size=64, collate_fn=collate):
            preds.append(model(**batch).logits.squeeze(-1))
            labels.append(batch["labels"])
    model.train()
    return compute_metrics(spec, torch.cat(preds).numpy(), torch.cat(labels).numpy())["pearson"]


cfg = elalora.ElaLoRAConfig(r=args.r, total_steps=args.steps, modules_to_save=["classifier"])
handle = elalora.get_model(model, cfg)                       # wraps q,k,v,o,ffn in place
before = dev_pearson()
print(f"dev Pearson before training: {before:.3f} ({len(dev)} examples); training {args.steps} steps", flush=True)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
sched = get_linear_schedule_with_warmup(opt, args.steps // 10, args.steps)
model.train()
step, losses, t0 = 0, [], time.time()
while step < args.steps:
    for batch in loader:
        loss = model(**batch).loss                           # + γ·R, added by elalora's forward hook
        loss.backward()
        opt.step()
        handle.step(opt)                                     # scores, rank rounds: after step(), before zero_grad()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        step += 1
        if step % 10 == 0 or step == args.steps:
            left = (time.time() - t0) / step * (args.steps - step)
            print(f"step {step}/{args.steps}  loss {sum(losses[-10:]) / len(losses[-10:]):.3f}  "
                  f"total rank {handle.total_rank}  ~{left:.0f} s left", flush=True)
        if step == args.steps:
            break
after = dev_pearson()
out = pathlib.Path(args.out)
handle.save_pretrained(str(out / "adapter"))
handle.export_peft(str(out / "peft"))                        # + elalora_head.json: the mean pooling it needs
k = min(10, len(losses))
print(json.dumps({"loss_first10": sum(losses[:k]) / k, "loss_last10": sum(losses[-k:]) / k,
                  "dev_pearson_before": before, "dev_pearson_after": after, "total_rank": handle.total_rank,
                  "rounds": handle.allocator.rounds, "ranks_moved": handle.allocator.moved,
                  "seconds": round(time.time() - t0, 1)}, indent=1))
print(f"dev Pearson {before:.3f} -> {after:.3f} in {args.steps} steps; adapter in {out}"
      + ("" if math.isfinite(after) and after > before else "  (no gain: see the docstring for the settings)"))
