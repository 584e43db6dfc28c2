"""Mean pooling (elalora.heads) and the CLI's --pooling / --modules-to-save flags."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import minilm_path, tiny_bert
from test_cli import TINY, _train, fx  # noqa: F401  (fx is a fixture)

from elalora.cli.main import main
from elalora.heads import MeanPooler, pooling_of, use_mean_pooling


def _masked_mean_by_hand(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    rows = []
    for i in range(h.shape[0]):
        keep = [h[i, t] for t in range(h.shape[1]) if mask[i, t]]
        rows.append(sum(keep) / len(keep))
    return torch.stack(rows)


def test_mean_pooler_is_the_masked_mean_and_ignores_padding():
    model = tiny_bert()
    ids = torch.randint(1, 100, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    with torch.no_grad():
        h = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        assert pooling_of(model) == "cls"
        use_mean_pooling(model)
        use_mean_pooling(model)  # idempotent: one pooler, one hook
        assert pooling_of(model) == "mean" and isinstance(model.bert.pooler, MeanPooler)
        assert len(model.bert._forward_pre_hooks) == 1
        out = model.bert(input_ids=ids, attention_mask=mask).pooler_output
        torch.testing.assert_close(out, _masked_mean_by_hand(h, mask), rtol=1e-5, atol=1e-6)
        # the second example alone, unpadded, pools to the same vector
        alone = model.bert(input_ids=ids[1:2, :4], attention_mask=mask[1:2, :4]).pooler_output
        torch.testing.assert_close(alone[0], out[1], rtol=1e-5, atol=1e-6)
        # the classifier reads the pooled mean (dropout is off in eval mode)
        logits = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(logits, model.classifier(out), rtol=1e-5, atol=1e-6)
    assert not list(model.bert.pooler.parameters())


def test_mean_pooling_needs_a_pooler():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    m = LlamaForSequenceClassification(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, num_key_value_heads=2, vocab_size=50))
    with pytest.raises(ValueError, match="no 'pooler'"):
        use_mean_pooling(m)


@pytest.mark.skipif(minilm_path() is None, reason="needs the MiniLM tokenizer")
def test_cli_modules_to_save_trains_the_pooler(fx, tmp_path):  # noqa: F811
    for method in ("lora", "elalora"):
        base, pooled = tmp_path / f"{method}-head", tmp_path / f"{method}-pooler"
        assert _train(fx, base, "--method", method, "--r", "2") == 0
        assert _train(fx, pooled, "--method", method, "--r", "2", "--modules-to-save", "pooler,classifier") == 0
        cfg = json.loads((pooled / "config.json").read_text())
        assert cfg["modules_to_save"] == ["pooler", "classifier"] and cfg["pooling"] == "cls"
        n_base = json.loads((base / "metrics.json").read_text())["parameters"]["trainable"]
        n_pool = json.loads((pooled / "metrics.json").read_text())["parameters"]["trainable"]
        assert n_pool - n_base == 32 * 32 + 32  # the tiny BERT's pooler dense layer, weight + bias
        # the saved adapter holds the trained pooler: eval reproduces the run's own final metric
        f = tmp_path / f"{method}.json"
        assert main(["eval", "--adapter", str(pooled), "--output", str(f)]) == 0
        final = json.loads((pooled / "metrics.json").read_text())["final"]
        assert json.loads(f.read_text())["metrics"]["accuracy"] == pytest.approx(final["accuracy"], abs=1e-9)


@pytest.mark.skipif(minilm_path() is None, reason="needs the MiniLM tokenizer")
def test_cli_mean_pooling_round_trip(fx, tmp_path):  # noqa: F811
    run = tmp_path / "mean"
    assert _train(fx, run, "--method", "lora", "--r", "2", "--pooling", "mean", task="stsb") == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["pooling"] == "mean" and cfg["modules_to_save"] == ["classifier"]
    f = tmp_path / "m.json"
    assert main(["eval", "--adapter", str(run), "--output", str(f)]) == 0
    final = json.loads((run / "metrics.json").read_text())["final"]
    assert json.loads(f.read_text())["metrics"]["pearson"] == pytest.approx(final["pearson"], rel=1e-5)
    # a merged checkpoint carries the head it needs (elalora_head.json + README.md naming the one call), and
    # elalora eval restores it: the run's own metric
    assert main(["export", "--adapter", str(run), "--to", "merged", "--output-dir", str(tmp_path / "x")]) == 0
    head = json.loads((tmp_path / "x" / "elalora_head.json").read_text())
    assert head["pooling"] == "mean" and head["task_type"] == "regression" and head["num_labels"] == 1
    assert "use_mean_pooling(model)" in (tmp_path / "x" / "README.md").read_text()
    assert main(["eval", "--adapter", str(tmp_path / "x"), "--output", str(f)]) == 0
    assert json.loads(f.read_text())["format"] == "merged"
    assert json.loads(f.read_text())["metrics"]["pearson"] == pytest.approx(final["pearson"], abs=1e-5)


@pytest.mark.skipif(minilm_path() is None, reason="needs the MiniLM tokenizer")
@pytest.mark.parametrize("extra, message", [
    (["--modules-to-save", "pooler"], "must include the task head"),
    (["--modules-to-save", "nosuch,classifier"], "no module of the model is named 'nosuch'"),
    (["--modules-to-save", "pooler,classifier", "--pooling", "mean"], "has no parameters"),
    (["--modules-to-save", " , "], "is empty"),
])
def test_cli_bad_modules_to_save_is_one_line(fx, tmp_path, capsys, extra, message):  # noqa: F811
    assert _train(fx, tmp_path / "bad", "--method", "lora", "--r", "2", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad").exists()
