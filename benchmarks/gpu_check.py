"""The one prepared GPU check (issue 37; docs/large_models.md): what only an accelerator can show.

    python benchmarks/gpu_check.py                    # any CUDA machine, ~1.1B Llama in bf16, a few minutes
    python benchmarks/gpu_check.py --tiny             # CPU smoke test in seconds (the test suite runs it)

A Llama-shaped model of random weights (``transformers.LlamaConfig``; TinyLlama's 1.1B shape: hidden
2048, 22 layers, 32 heads / 4 KV heads, MLP 5632) in bf16, adapted on every projection (q, k, v, o,
gate, up, down: 154 matrices), is trained twice side by side from the same weights and batches:

* ``peft_lora``: PEFT LoRA at ``r``;
* ``elalora``: ElaLoRA at the same ``r`` (LoRA form, the library's default; a round every ``--delta-t``
  steps), ``handle.step(optimizer)`` after ``optimizer.step()``.

Steps alternate between the two (one step each, order swapped every pair) so that both see the same
machine. Reported: median step time of each and their ratio (rounds included, and without them); peak
memory of each, measured in separate phases (``torch.cuda.reset_peak_memory_stats`` before, max allocated
after) over the same steps; the wall time of one round (``handle.step`` on a round step, synchronised)
and of an ordinary ``handle.step``; the device synchronisations of each, counted by CUDA's sync debug
mode (``torch.cuda.set_sync_debug_mode("warn")``: one warning per synchronising call) next to the
library's own transfer counts (:data:`elalora.layers.TRANSFERS`); and the whole path: rounds happened
with the total rank kept, ``save_pretrained`` + ``load_adapter`` reproduce the logits, ``export_peft``
(both layouts) reloads with plain PEFT onto a fresh copy of the base and reproduces the logits,
``merge`` / ``unmerge`` and ``merge_and_unload`` reproduce them too (bf16 tolerance: the merged weight is
rounded to bf16 once).

Writes ``benchmarks/results/gpu_check.json`` (``--out``) with the machine and :func:`_common.provenance`.
Exit status 1 if any check of the path failed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, machine_info, write_json  # noqa: E402
from _records import provenance  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = {
    # TinyLlama-1.1B's shape: 1.10e9 parameters
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128),
}


def build(size: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**SIZES[size], max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SyncCounter:
    """Counts CUDA's synchronising calls inside the block (CUDA sync debug mode ``warn``); ``None`` elsewhere."""

    def __init__(self, device: torch.device):
        self.device, self.n = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
            self._w = warnings.catch_warnings(record=True)
            self._rec = self._w.__enter__()
            warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            self.n = sum("synchroniz" in str(w.message).lower() for w in self._rec)
            self._w.__exit__(*exc)
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU (smoke test, seconds)")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40, help="steps of each variant")
    ap.add_argument("--delta-t", type=int, default=5, help="ElaLoRA: a round every delta_t steps")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--out", default=None, help="JSON record path (default benchmarks/results/gpu_check.json; "
                    "with --tiny nothing is written unless given)")
    args = ap.parse_args(argv)
    import peft

    import elalora
    from elalora.layers import TRANSFERS

    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    size = "tiny" if args.tiny else "1b"
    if args.tiny:
        args.steps, args.seq, args.batch, args.delta_t = min(args.steps, 8), min(args.seq, 8), 2, min(args.delta_t, 2)
    dtype = torch.bfloat16
    t_start = time.time()
    base_cpu_state = None
    g = torch.Generator(device="cpu").manual_seed(1)
    vocab = SIZES[size]["vocab_size"]
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=g, device="cpu") for _ in range(args.steps)]
    probe = torch.randint(0, vocab, (2, min(args.seq, 64)), generator=g, device="cpu").to(device)

    # --------------------------------------------------------------------------- the two models
    ela_model = build(size, dtype, device)
    base_cpu_state = {k: v.detach().to("cpu") for k, v in ela_model.state_dict().items()}
    n_params = sum(p.numel() for p in ela_model.parameters())

    def fresh_base():  # same seed, same weights; loaded again from the copy to be sure
        m = build(size, dtype, device)
        m.load_state_dict(base_cpu_state)
        return m.eval()

    peft_model = peft.get_peft_model(fresh_base(), peft.LoraConfig(r=args.r, lora_alpha=2 * args.r,
                                                                  target_modules=TARGETS))
    total = args.steps
    cfg = elalora.ElaLoRAConfig(r=args.r, target_modules=TARGETS, total_steps=total, tinit=1, tfinal=2,
                                delta_t=args.delta_t, b=4, k=2)
    handle = elalora.get_model(ela_model, cfg)
    opts = {
        "elalora": torch.optim.AdamW(handle.adapter_parameters(), lr=1e-3),
        "peft_lora": torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3),
    }
    models = {"elalora": ela_model, "peft_lora": peft_model}
    for m in models.values():
        m.train()
    rounds = [t for t in range(total) if handle.allocator.is_round(t)]
    rank0 = handle.total_rank

    times = {k: [] for k in models}
    step_call = {"round": [], "plain": []}
    syncs = {"round": [], "plain": []}
    transfers = {"round": [], "plain": []}
    peak = {k: 0 for k in models}

    def one_step(name: str, t: int) -> None:
        model, opt = models[name], opts[name]
        x = batches[t].to(device)
        sync(device)
        t0 = time.perf_counter()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        if name == "elalora":
            kind = "round" if t in rounds else "plain"
            before = dict(TRANSFERS)
            sync(device)
            t1 = time.perf_counter()
            with SyncCounter(device) as sc:
                handle.step(opt)
            sync(device)
            step_call[kind].append(time.perf_counter() - t1)
            syncs[kind].append(sc.n)
            transfers[kind].append({k: TRANSFERS[k] - before.get(k, 0) for k in ("to_host", "to_device")})
        opt.zero_grad(set_to_none=True)
        sync(device)
        times[name].append(time.perf_counter() - t0)

    # interleaved timing run; peak memory per variant in its own phase of the same steps
    half = total // 2
    for t in range(half):
        for name in (("elalora", "peft_lora") if t % 2 == 0 else ("peft_lora", "elalora")):
            one_step(name, t)
    for name in ("peft_lora", "elalora"):  # memory phases: one variant at a time (second half of the run)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device)
        for t in range(half, total):
            one_step(name, t)
        if cuda:  # both models stay resident: a variant's peak is the base, its own state and its step's extra
            peak[name] = torch.cuda.max_memory_allocated(device) - resident
    base_bytes = sum(v.numel() * v.element_size() for v in base_cpu_state.values())

    def own_state(name: str) -> int:  # trainable parameters, their gradients and AdamW's two moments
        ps = [p for p in models[name].parameters() if p.requires_grad]
        extra = handle.importance.state_bytes() if name == "elalora" else 0
        return 4 * sum(p.numel() * p.element_size() for p in ps) + extra

    if cuda:
        peak = {k: base_bytes + own_state(k) + v for k, v in peak.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    plain_ela = [dt for t, dt in zip(list(range(half)) + list(range(half, total)), times["elalora"])
                 if t not in rounds]
    res = {
        "command": command_line(), "machine": machine_info(torch.get_num_threads()), "provenance": provenance(),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "size": size, "parameters": n_params,
        "dtype": str(dtype), "r": args.r, "steps": total, "batch": [args.batch, args.seq],
        "matrices": len(handle.adapters), "rounds": rounds,
        "step_ms_median": {k: v * 1e3 for k, v in med.items()},
        "step_ratio_elalora_over_peft": med["elalora"] / med["peft_lora"],
        "elalora_step_ms_median_without_rounds": statistics.median(plain_ela) * 1e3 if plain_ela else None,
        "peak_memory_bytes": peak if cuda else None,
        "peak_memory_ratio": (peak["elalora"] / peak["peft_lora"]) if cuda and peak["peft_lora"] else None,
        "handle_step_ms": {k: (statistics.median(v) * 1e3 if v else None) for k, v in step_call.items()},
        "round_ms_max": max(step_call["round"]) * 1e3 if step_call["round"] else None,
        "cuda_syncs_per_handle_step": {k: (max(v) if v and v[0] is not None else None) for k, v in syncs.items()},
        "library_transfers_per_handle_step": {k: (max(v, key=lambda d: sum(d.values())) if v else None)
                                              for k, v in transfers.items()},
    }
    # ------------------------------------------------------------------------------- the whole path
    checks: dict[str, object] = {}
    tol = dict(rtol=2e-2, atol=2e-2)  # bf16 logits
    handle.model.eval()
    with torch.no_grad():
        want = ela_model(input_ids=probe).logits.float()
    checks["rounds_happened"] = bool(handle.events)
    checks["total_rank_kept"] = handle.total_rank == rank0
    with tempfile.TemporaryDirectory() as tmp:
        handle.save_pretrained(f"{tmp}/ad")
        h2 = elalora.load_adapter(fresh_base(), f"{tmp}/ad")
        with torch.no_grad():
            got = h2.model(input_ids=probe).logits.float()
        checks["save_load_logits"] = bool(torch.allclose(got, want, **tol))
        del h2, got
        for layout in ("compact", "uniform"):
            handle.export_peft(f"{tmp}/{layout}", layout=layout)
            pm = peft.PeftModel.from_pretrained(fresh_base(), f"{tmp}/{layout}").eval()
            with torch.no_grad():
                got = pm(input_ids=probe).logits.float()
            checks[f"export_{layout}_plain_peft_logits"] = bool(torch.allclose(got, want, **tol))
            checks[f"export_{layout}_max_abs_diff"] = float((got - want).abs().max())
            del pm, got
    handle.merge()
    with torch.no_grad():
        merged = ela_model(input_ids=probe).logits.float()
    handle.unmerge()
    with torch.no_grad():
        unmerged = ela_model(input_ids=probe).logits.float()
    checks["merge_logits"] = bool(torch.allclose(merged, want, **tol))
    checks["unmerge_exact"] = bool(torch.equal(unmerged, want))
    unloaded = handle.merge_and_unload()
    with torch.no_grad():
        checks["merge_and_unload_logits"] = bool(torch.allclose(unloaded(input_ids=probe).logits.float(), want, **tol))
    res["checks"] = checks
    res["path_ok"] = all(v for k, v in checks.items() if not k.endswith("max_abs_diff"))
    res["wall_s"] = round(time.time() - t_start, 1)
    out = args.out or (None if args.tiny else str(RESULTS / "gpu_check.json"))
    if out:
        write_json(Path(out), res)
    print(f"{res['device']}: {n_params / 1e9:.2f}B params, {res['matrices']} matrices, r {args.r}; step median "
          f"elalora {res['step_ms_median']['elalora']:.1f} ms vs PEFT LoRA "
          f"{res['step_ms_median']['peft_lora']:.1f} ms "
          f"(ratio {res['step_ratio_elalora_over_peft']:.3f}); peak memory ratio {res['peak_memory_ratio']}; "
          f"round {res['handle_step_ms']['round']} ms, plain handle.step {res['handle_step_ms']['plain']} ms; "
          f"CUDA syncs per round {res['cuda_syncs_per_handle_step']['round']}, per plain step "
          f"{res['cuda_syncs_per_handle_step']['plain']}; path ok: {res['path_ok']} {checks}")
    return 0 if res["path_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
