"""The Hugging Face ``Trainer`` side of a run: collators and lengths per task kind, the Trainer
subclass (length-grouped batches, generation evaluation), training arguments, the distributed
launch environment, evaluation of a model on examples, and the check that a run beat the trivial
answer (:func:`trivial_report`).

Imports: transformers, torch, tqdm, :mod:`elalora.tasks`, :mod:`elalora.errors`, :mod:`elalora._extras`.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

from .._extras import require
from ..errors import RunError

require("accelerate", "the Hugging Face Trainer")  # transformers' Trainer needs it; fail with the extra to install

from transformers import Trainer  # noqa: E402
from transformers.trainer_pt_utils import LengthGroupedSampler  # noqa: E402

__all__ = ["make_collator", "example_lengths", "TaskTrainer", "training_args", "world_size", "distributed_launch",
           "is_main_process", "prediction_metrics", "generation_evaluator", "evaluate_model", "trivial_score",
           "trivial_report"]


def make_collator(spec, tokenizer, image_processor, max_length: int):
    from ..tasks import CausalLMCollator, ImageCollator, TextClassificationCollator

    if spec.kind in ("classification", "regression"):
        return TextClassificationCollator(tokenizer, max_length, spec.kind)
    if spec.kind == "generation":
        return CausalLMCollator(tokenizer, max_length)
    if spec.kind == "image":
        return ImageCollator(image_processor)
    raise RunError(f"unsupported task kind {spec.kind!r}")


def example_lengths(spec, tokenizer, examples: list[dict], max_length: int) -> list[int] | None:
    """Token counts used to batch examples of similar length together (text tasks only)."""
    if spec.kind in ("classification", "regression"):
        a = [ex["text_a"] for ex in examples]
        b = [ex["text_b"] for ex in examples] if examples and "text_b" in examples[0] else None
        enc = tokenizer(a, b, truncation=True, max_length=max_length)
        return [len(x) for x in enc["input_ids"]]
    if spec.kind == "generation":
        from ..tasks import build_prompt

        texts = [build_prompt(ex) + " " + str(ex["target"]) for ex in examples]
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        return [len(x) for x in enc["input_ids"]]
    return None


class TaskTrainer(Trainer):
    """Trainer with length-grouped batches from precomputed lengths and a generation evaluation."""

    def __init__(self, *a, lengths=None, generation_eval=None, **kw):
        super().__init__(*a, **kw)
        self._lengths = lengths
        self._generation_eval = generation_eval

    def _get_train_sampler(self, train_dataset=None):
        if self._lengths is not None:
            # Megabatches of the *global* batch: under DDP every optimizer step then sees the same
            # examples as one process with the same global batch (accelerate hands consecutive
            # per-device batches to consecutive processes), so the rank decisions agree too.
            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps
                                        * max(1, self.args.world_size), lengths=self._lengths)
        return super()._get_train_sampler(train_dataset)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        if self._generation_eval is None:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        start = time.time()
        metrics = self._generation_eval(self.model)
        out = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
        out[f"{metric_key_prefix}_runtime"] = round(time.time() - start, 4)
        self.log(out)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, out)
        return out


def training_args(out_dir: str, *, batch_size: int, eval_batch_size: int, lr: float = 1e-3, epochs: float = 1.0,
                   max_steps: int | None = None, grad_accum: int = 1, warmup_ratio: float = 0.0,
                   weight_decay: float = 0.0, seed: int = 0, eval_steps: int | None = None,
                   logging_steps: int = 10, bf16: bool = False, eval_enabled: bool = True):
    import torch
    from transformers import TrainingArguments

    if not eval_enabled or eval_steps == 0:
        strategy: dict[str, Any] = {"eval_strategy": "no"}
    elif eval_steps:
        strategy = {"eval_strategy": "steps", "eval_steps": eval_steps}
    else:
        strategy = {"eval_strategy": "epoch"}
    return TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=batch_size, per_device_eval_batch_size=eval_batch_size,
        learning_rate=lr, num_train_epochs=epochs, max_steps=max_steps if max_steps else -1,
        gradient_accumulation_steps=grad_accum, warmup_steps=warmup_ratio, weight_decay=weight_decay,
        lr_scheduler_type="linear", seed=seed, data_seed=seed, save_strategy="no", report_to=[],
        # NaN/inf losses must reach the logs (the divergence check reads them), not be averaged away
        logging_nan_inf_filter=False,
        logging_strategy="steps", logging_steps=logging_steps, logging_first_step=True,
        remove_unused_columns=False, label_names=["labels"], dataloader_num_workers=0,
        disable_tqdm=False, bf16=bf16, use_cpu=not torch.cuda.is_available(),
        # Under DDP transformers multiplies the loss by the world size for models that accept loss
        # kwargs but return a per-batch mean (BERT's classifier): it would double the gradients.
        average_tokens_across_devices=False,
        # gloo for CPU DDP only when launched distributed (torchrun sets WORLD_SIZE): on a single
        # process a ddp_backend makes accelerate query a process group that does not exist.
        ddp_backend="gloo" if distributed_launch() and not torch.cuda.is_available() else None, **strategy)


def world_size() -> int:
    """Processes of a distributed launch (``WORLD_SIZE``, set by torchrun / accelerate), else 1."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def distributed_launch() -> bool:
    return world_size() > 1


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a distributed launch (``RANK`` set by torchrun / accelerate)."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


def prediction_metrics(spec):
    from ..tasks import compute_metrics

    def fn(pred):
        preds = pred.predictions[0] if isinstance(pred.predictions, (tuple, list)) else pred.predictions
        labels = pred.label_ids
        return compute_metrics(spec, preds, labels)

    return fn


def generation_evaluator(spec, tokenizer, examples: list[dict], *, batch_size: int, max_length: int,
                         max_new_tokens: int):
    """Evaluate a causal LM on generation examples: greedy decoding, BLEU and ROUGE-L (with a progress bar)."""
    import torch
    from tqdm.auto import tqdm

    from ..tasks import eos_id, compute_metrics, encode_prompts

    eos = eos_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    @torch.no_grad()
    def run(model) -> dict[str, float]:
        was_training = model.training
        model.eval()
        preds: list[str] = []
        try:
            device = next(model.parameters()).device
            for i in tqdm(range(0, len(examples), batch_size), desc="generating", leave=False, dynamic_ncols=True):
                chunk = examples[i:i + batch_size]
                enc = encode_prompts(tokenizer, chunk, max_length)
                enc = {k: v.to(device) for k, v in enc.items()}
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     eos_token_id=eos, pad_token_id=pad)
                new = out[:, enc["input_ids"].shape[1]:]
                for row in tokenizer.batch_decode(new, skip_special_tokens=True):
                    preds.append(row.strip().split("\n")[0].strip())
        finally:
            model.train(was_training)
        return compute_metrics(spec, preds, [ex["references"] for ex in examples])

    return run


def evaluate_model(model, spec, tokenizer, image_processor, examples, *, batch_size: int, max_length: int,
                   max_new_tokens: int = 64, seed: int = 0) -> dict[str, float]:
    """Metrics of ``model`` on ``examples`` (the same code path as the evaluations during training)."""
    if spec.kind == "generation":
        return generation_evaluator(spec, tokenizer, examples, batch_size=batch_size, max_length=max_length,
                                    max_new_tokens=max_new_tokens)(model)
    with tempfile.TemporaryDirectory(prefix="elalora-eval-") as tmp:
        args = training_args(tmp, batch_size=batch_size, eval_batch_size=batch_size, seed=seed)
        trainer = TaskTrainer(model=model, args=args, eval_dataset=examples,
                              data_collator=make_collator(spec, tokenizer, image_processor, max_length),
                              compute_metrics=prediction_metrics(spec))
        out = trainer.evaluate()
    return {k: float(out[f"eval_{k}"]) for k in spec.metric_names if f"eval_{k}" in out}


def trivial_score(spec, examples) -> dict[str, float] | None:
    """The metrics of the best *constant* answer on ``examples`` (text/image classification and regression):

    * regression: any constant prediction (Pearson and Spearman are 0 by :func:`elalora.tasks.compute_metrics`'s
      convention for undefined correlations);
    * classification: the constant class that scores best on the main metric (the majority class for
      accuracy, the positive class for F1; every constant has MCC 0).

    ``None`` for generation tasks or examples without labels."""
    import numpy as np

    from ..tasks import compute_metrics

    if spec.kind not in ("classification", "regression", "image") or not examples or "label" not in examples[0]:
        return None
    labels = np.asarray([ex["label"] for ex in examples])
    if spec.kind == "regression":
        return compute_metrics(spec, np.zeros(len(labels)), labels)
    main = spec.metric_names[0]
    best = None
    for c in sorted({int(v) for v in labels.tolist()}):
        m = compute_metrics(spec, np.full(len(labels), c), labels)
        if best is None or m[main] > best[main]:
            best = m
    return best


def trivial_report(spec, examples, final: dict[str, float], *, pooling: str | None, lr: float | None,
                   steps: int) -> dict:
    """``{"trivial_score": metrics of the constant answer, "learned_nothing": warning or None}`` of a finished
    run whose final main metric is ``final``: the warning is one loud line when the run ended at or below
    the constant answer's score, naming the likely causes (pooling, learning rate, steps)."""
    trivial = trivial_score(spec, examples)
    main = spec.metric_names[0]
    if trivial is None or main not in final:
        return {"trivial_score": trivial, "learned_nothing": None}
    got, floor = float(final[main]), float(trivial[main])
    warning = None
    if not got > floor + 1e-9:
        answer = "a constant prediction" if spec.kind == "regression" else "always answering one class"
        pool = f"the pooling ({pooling}" + ("; a sentence-transformers checkpoint such as all-MiniLM-L6-v2 wants "
                                            "--pooling mean, which --pooling auto picks)" if pooling == "cls" else ")")
        rate = f"the learning rate (lr {lr:g}" + ("; LoRA adapters usually need about 1e-3, the HF Trainer's "
                                                   "default is 5e-5)" if lr is not None and lr < 1e-4 else
                                                   "; too high diverges, too low stands still)")
        warning = (f"WARNING: this run learned nothing: {main} {got:.4f} is no better than {answer} ({floor:.4f}). "
                   f"Likely causes: {pool}, {rate}, too few steps ({steps}: train longer, e.g. more --epochs), "
                   "or too little data")
    return {"trivial_score": trivial, "learned_nothing": warning}
