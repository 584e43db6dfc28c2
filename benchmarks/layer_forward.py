"""Why is an ElaLoRA training step of MiniLM not slower than a PEFT LoRA step? One adapted layer, timed.

    python benchmarks/layer_forward.py --repeats 30

``benchmarks/step_overhead.py`` finds our ElaLoRA step ~10 % *faster* than PEFT LoRA's although ours
holds twice the rank slots and adds score updates. This script isolates the adapter layer: forward
and backward of one adapted ``nn.Linear`` at the MiniLM shapes (384→384, 384→1536, 1536→384) on
4096 tokens (batch 32 × 128), frozen base weight, gradient needed for the input (as for every layer
above the first), 1 thread. Variants, interleaved, order rotated each repeat:

* ``peft_lora``      PEFT LoRA ``Linear``, r 8, alpha 16: ``y + B(A(x)) · s`` (the scale multiplies the
                     d_out-wide output, forward and backward);
* ``peft_adalora``   PEFT AdaLoRA ``SVDLinear``, r 12: ``y + (x (A⊙E)ᵀ Bᵀ) · s / ranknum``;
* ``ours``           our ``SVDAdapter``, 8 active of 16 slots: ``y + ((x Qᵀ) ⊙ (λ⊙m·s)) Pᵀ``, the
                     scale folded into the c-wide gate;
* ``plain_out_scale`` / ``plain_gate_scale``: the same two-matmul LoRA written by hand in torch, with
                     the scale on the output vs on the rank dimension: the ablation that isolates the
                     one difference.

Reported: median time per forward+backward and the median paired ratio to ``peft_lora``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, machine_info, machine_md, md_table, median, write_results  # noqa: E402

SHAPES = [(384, 384), (384, 1536), (1536, 384)]
VARIANTS = ["peft_lora", "peft_adalora", "ours", "plain_out_scale", "plain_gate_scale"]


class _Plain(nn.Module):
    def __init__(self, base: nn.Linear, r: int, scale: float, on_gate: bool):
        super().__init__()
        self.base, self.s, self.on_gate = base, scale, on_gate
        self.A = nn.Parameter(torch.randn(r, base.in_features) * 0.02)
        self.B = nn.Parameter(torch.randn(base.out_features, r) * 0.02)

    def forward(self, x):
        y = self.base(x)
        if self.on_gate:
            return y + ((x @ self.A.t()) * self.s) @ self.B.t()
        return y + (x @ self.A.t() @ self.B.t()) * self.s


def build(name: str, d_in: int, d_out: int) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    base.requires_grad_(False)
    if name == "peft_lora":
        from peft import LoraConfig, get_peft_model

        m = get_peft_model(nn.Sequential(base), LoraConfig(r=8, lora_alpha=16, target_modules=["0"]))
        layer = m.base_model.model[0]
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_(0, 0.02)
        return layer
    if name == "peft_adalora":
        from peft import AdaLoraConfig, get_peft_model

        m = get_peft_model(nn.Sequential(base), AdaLoraConfig(init_r=12, target_r=8, lora_alpha=16,
                                                             target_modules=["0"], total_step=100))
        return m.base_model.model[0]
    if name == "ours":
        from elalora.layers import SVDAdapter

        a = SVDAdapter(base, r=8, capacity=16, lora_alpha=16)
        with torch.no_grad():
            a.lora_lambda[:8].normal_(0, 0.1)
        return a
    if name.startswith("plain_"):
        return _Plain(base, 8, 2.0, on_gate=name == "plain_gate_scale")
    raise ValueError(name)


def fwd_bwd(mod: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> float:
    t0 = time.perf_counter()
    y = mod(x)
    y.backward(gy)
    dt = time.perf_counter() - t0
    x.grad = None
    for p in mod.parameters():
        p.grad = None
    return dt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=32 * 128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "layer_forward"))
    ap.add_argument("--quick", action="store_true", help="smoke test: 3 repeats, 256 tokens, no file output")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.tokens = 3, 256
    torch.set_num_threads(args.threads)
    info = machine_info(torch.get_num_threads())
    res = {"command": command_line(), "machine": info, "shapes": {}}
    rows = []
    for d_in, d_out in SHAPES:
        mods = {v: build(v, d_in, d_out) for v in VARIANTS}
        for m in mods.values():
            m.train()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(args.tokens, d_in, generator=g).requires_grad_(True)
        gy = torch.randn(args.tokens, d_out, generator=g)
        with torch.no_grad():  # every variant computes the same kind of output (sanity, not a value check)
            for v, m in mods.items():
                assert m(x).shape == (args.tokens, d_out), v
        for v in VARIANTS:  # warm-up
            fwd_bwd(mods[v], x, gy)
        times = {v: [] for v in VARIANTS}
        for rep in range(args.repeats):
            order = VARIANTS[rep % len(VARIANTS):] + VARIANTS[:rep % len(VARIANTS)]
            for v in order:
                times[v].append(fwd_bwd(mods[v], x, gy))
        key = f"{d_in}x{d_out}"
        res["shapes"][key] = {}
        for v in VARIANTS:
            paired = median([a / b for a, b in zip(times[v], times["peft_lora"])])
            med = median(times[v]) * 1e3
            res["shapes"][key][v] = {"median_ms": med, "paired_ratio_to_peft_lora": paired, "times_s": times[v]}
            rows.append([key, v, f"{med:.2f}", f"{paired:.3f}"])
        print(f"{key}: " + ", ".join(f"{v} {res['shapes'][key][v]['median_ms']:.2f} ms" for v in VARIANTS), flush=True)
    md = (f"# One adapted layer, forward + backward\n\nCommand: `{res['command']}`\n\n{machine_md(info)}\n\n"
          f"{args.tokens} tokens, frozen base, input gradient needed, medians of {args.repeats} interleaved "
          "repeats.\n\n"
          + md_table(["shape (d_in×d_out)", "variant", "median fwd+bwd (ms)", "median paired ratio to peft_lora"],
                     rows)
          + "\n")
    write_results(args.out, res, md, quick=args.quick)


if __name__ == "__main__":
    main()
