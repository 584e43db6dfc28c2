"""The benchmark layer's bookkeeping (no training): the arms table, grid, resume-by-skipping, torn JSONL lines,
tables, and that the benchmarks use the library's public API only."""

import json
import statistics
from pathlib import Path

import pytest

from conftest import load_benchmark
from tolerances import assert_close

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def acc():
    return load_benchmark("accuracy")


def _rec(task, method, r, seed, main, steps=100):
    return {"task": task, "method": method, "r": r, "seed": seed, "max_steps": steps, "main": main,
            "trainable_params": 1000 + r, "active_params": 900 + r}


def test_grid_counts(acc):
    cells = acc.grid(acc.TASKS, ["peft-lora", "peft-adalora", "elalora"], [2, 8], [0, 1, 2], with_extra=False)
    assert len(cells) == 4 * 3 * 2 * 3 == 72 and len(set(cells)) == 72
    extra = acc.grid(["rte"], ["peft-adalora", "elalora"], [2, 8], [0], with_extra=True)
    assert ("rte", "peft-adalora", 4, 0) in extra and ("rte", "elalora", 4, 0) not in extra


def test_grid_interleaves_the_arms_of_one_seed_and_takes_seeds_per_task(acc):
    cells = acc.grid(["mrpc", "stsb"], ["peft-lora", "elalora-lora-g1"], [2, 8], {"mrpc": [0, 1], "stsb": [0]}, False)
    assert cells[:4] == [("mrpc", "peft-lora", 2, 0), ("mrpc", "elalora-lora-g1", 2, 0),
                         ("mrpc", "peft-lora", 2, 1), ("mrpc", "elalora-lora-g1", 2, 1)]
    assert len(cells) == 2 * 2 * 2 + 2 * 2 * 1


def _pilot(acc, diffs, protocol="v3-rerun", cpu="cpu A"):
    """Pilot records of the rerun: PEFT LoRA at 0.80 and ElaLoRA at 0.80 + d/100, d per (task, r) and seed."""
    out = []
    for (task, r), ds in diffs.items():
        for seed, d in enumerate(ds):
            for method, main in (("peft-lora", 0.80), ("elalora-lora-g1", 0.80 + d / 100)):
                out.append({**_rec(task, method, r, seed, main), "protocol": protocol, "cpu": cpu,
                            "provenance": {"versions": {"torch": "2.13.0"}}})
    return out


def test_power_rule_reads_the_sd_only_and_gives_every_cell_of_a_task_the_largest_n(acc):
    import _stats

    # hand check of the rule (t quantiles from tables): sd 0.3, effect 1: n = 3 passes (4.303 + 1.061 = 5.36 <=
    # sqrt(3)/0.3 = 5.77), n = 2 fails (12.71 + 1.376 > 4.71)
    assert _stats.power_seeds(0.3) == 3 and _stats.power_seeds(5.0, cap=30) == 30
    n = _stats.power_seeds(0.8, cap=100)
    assert _stats.detectable_effect(0.8, n) <= 1.0 < _stats.detectable_effect(0.8, n - 1)  # its inverse
    diffs = {("mrpc", 2): [0.2, 1.2, 0.3], ("mrpc", 8): [2.4, 1.7, 0.6],  # sd 0.55 and 0.90
             ("stsb", 2): [-1.9, -0.5, -1.5], ("stsb", 8): [4.5, 0.3, 0.4]}  # sd 0.72 and 2.40
    plan = acc.power_plan(_pilot(acc, diffs))
    assert plan["mrpc"]["by_r"][8]["asks"] == _stats.power_seeds(statistics.stdev([2.4, 1.7, 0.6]), cap=10_000)
    assert plan["mrpc"]["seeds"] == max(x["asks"] for x in plan["mrpc"]["by_r"].values())
    assert plan["stsb"]["asks"] > 30 and plan["stsb"]["seeds"] == 30  # the cap
    flipped = acc.power_plan(_pilot(acc, {k: [-d for d in v] for k, v in diffs.items()}))
    assert {t: p["seeds"] for t, p in flipped.items()} == {t: p["seeds"] for t, p in plan.items()}  # symmetric
    # v3's records are another batch: they never count as the rerun's pilot
    with pytest.raises(SystemExit, match="--seeds 0,1,2"):
        acc.power_plan(_pilot(acc, diffs, protocol="v3"))
    partial = [x for x in _pilot(acc, diffs) if not (x["task"] == "stsb" and x["seed"] == 2)]
    with pytest.raises(SystemExit, match="missing 4 cells"):
        acc.power_plan(partial)
    assert acc.power_plan(partial, strict=False)["stsb"]["seeds"] is None


def test_power_table_flags_a_batch_from_two_machines(acc):
    diffs = {(t, r): [0.5, 1.0, 1.5] for t in ("mrpc", "stsb") for r in (2, 8)}
    one = acc.power_table(_pilot(acc, diffs))
    assert "All 24 cells ran on one machine (cpu A)" in one and "rerun at 5 seeds; 2 seeds to go" in one
    two = _pilot(acc, diffs)
    two[0]["cpu"] = "cpu B"
    assert "2 machines" in acc.power_table(two) and "rerun them on one machine" in acc.power_table(two)


def test_records_append_and_torn_line(acc, tmp_path):
    from _records import append_record, read_records

    f = tmp_path / "a.jsonl"
    append_record(_rec("rte", "elalora", 8, 0, 0.5), f)
    with open(f, "a") as fh:
        fh.write('{"task": "rte", "meth')  # an interrupted write
    append_record(_rec("rte", "elalora", 8, 1, 0.6), f)
    recs = read_records(f)
    assert [r["seed"] for r in recs] == [0, 1]


def test_render_table_means_pending_and_avg(acc):
    recs = [_rec(t, "elalora", 8, s, v) for t in acc.TASKS for s, v in ((0, 0.5), (1, 0.6), (2, 0.7))]
    recs.append(_rec("rte", "peft-lora", 8, 0, 0.55))
    recs.append(_rec("rte", "peft-lora", 8, 1, 0.99, steps=50))  # other step budget: ignored
    table = acc.render_table(recs, tasks=acc.TASKS, methods=["peft-lora", "elalora"], rs=[8], seeds=[0, 1, 2],
                             steps=100, with_extra=False)
    rows = {line.split("|")[2].strip(): line for line in table.splitlines() if line.startswith("| 8 ")}
    assert "60.0 ± 10.0" in rows["ElaLoRA (ours)"] and rows["ElaLoRA (ours)"].rstrip(" |").endswith("60.0")
    assert "55.0 ± 0.0 (1/3 seeds)" in rows["PEFT LoRA"] and "pending" in rows["PEFT LoRA"]
    assert "13 of 24 cells done (3 seeds: 0, 1, 2;" in table
    # the note counts the seeds it was given
    two = acc.render_table(recs, tasks=acc.TASKS, methods=["elalora"], rs=[8], seeds=[0, 1], steps=100,
                           with_extra=False)
    assert "8 of 8 cells done (2 seeds: 0, 1;" in two, two
    # an arm that will not be run further: its missing cells read "not run", its avg "–", and they leave the count
    table = acc.render_table(recs, tasks=acc.TASKS, methods=["peft-lora", "elalora"], rs=[8], seeds=[0, 1, 2],
                             steps=100, with_extra=False, not_run={"peft-lora": "dropped"})
    row = [line for line in table.splitlines() if "| PEFT LoRA |" in line][0]
    assert "55.0 ± 0.0 (1/3 seeds)" in row and row.count("not run") == 3 and row.rstrip(" |").endswith("–"), row
    assert "pending" not in row and "13 of 15 cells done" in table and "9 not run: PEFT LoRA: dropped" in table


def test_write_doc_table_replaces_only_the_block(acc, tmp_path):
    doc = tmp_path / "results.md"
    doc.write_text(f"# R\n\nbefore\n\n{acc.BEGIN}\nold\n{acc.END}\n\nafter\n")
    acc.write_doc_table("NEW TABLE", doc)
    text = doc.read_text()
    assert "NEW TABLE" in text and "old" not in text and "before" in text and "after" in text
    json.dumps(text)


def test_layer_forward_ablation_variants_compute_the_same_function():
    """benchmarks/layer_forward.py compares 'scale on the output' with 'scale on the rank dimension':
    only a fair ablation if both are the same maths (same output and same gradients)."""
    lf = load_benchmark("layer_forward")
    import torch

    out_s, gate_s = lf.build("plain_out_scale", 12, 20), lf.build("plain_gate_scale", 12, 20)
    gate_s.load_state_dict(out_s.state_dict())
    x = torch.randn(7, 12, requires_grad=True)
    y1 = out_s(x)
    y1.sum().backward()
    g1 = (x.grad.clone(), out_s.A.grad.clone(), out_s.B.grad.clone())
    x.grad = None
    y2 = gate_s(x)
    y2.sum().backward()
    assert_close(y1, y2)  # the scale moves between matmuls: same terms, another order
    for a, b in zip(g1, (x.grad, gate_s.A.grad, gate_s.B.grad)):
        assert_close(a, b)
    for name in lf.VARIANTS:  # every variant builds at a MiniLM shape and maps d_in -> d_out
        assert lf.build(name, 16, 24)(torch.randn(3, 16)).shape == (3, 24)


def test_other_step_budget_gets_its_own_block(acc, tmp_path):
    doc = tmp_path / "results.md"
    doc.write_text(f"# R\n\n{acc.BEGIN}\nMAIN\n{acc.END}\n\nafter\n")
    acc.write_doc_table("LONG", doc, steps=300)
    acc.write_doc_table("LONG2", doc, steps=300)  # second render replaces its own block only
    acc.write_doc_table("MAIN2", doc, steps=acc.DEFAULT_STEPS)
    text = doc.read_text()
    assert "MAIN2" in text and "MAIN\n" not in text
    assert "LONG2" in text and "LONG\n" not in text
    assert text.index(acc.END) < text.index("300 steps per cell") < text.index("LONG2") < text.index("after")


def test_protocol_cells_carry_its_knobs_and_render_apart(acc):
    proto = {"epochs": {"cola": 1}, "lr": {"lora": 1e-3, "svd": 2e-3}, "pooling": "mean",
             "modules_to_save": ["pooler", "classifier"], "max_length": {"cola": 64}, "batch_size": 32}
    lora = acc.cell_fields("cola", "peft-lora", 8, 0, 268, "D", 1, proto)
    ela = acc.cell_fields("cola", "elalora", 8, 0, 268, "D", 1, proto)
    assert lora["lr"] == 1e-3 and ela["lr"] == 2e-3  # lr per method family
    assert lora["pooling"] == "mean" and lora["modules_to_save"] == ["pooler", "classifier"]
    assert lora["max_length"] == 64 and lora["batch_size"] == 32 and lora["max_steps"] == 268
    legacy = acc.cell_fields("cola", "peft-lora", 8, 0, 100, "D", 1)
    # the legacy protocol's cls pooling is named (RunSpec's default "auto" would choose mean on MiniLM)
    assert legacy["pooling"] == "cls" and legacy["lr"] == acc.SHARED["lr"]
    # the equivalent `elalora train` line the record keeps as argv
    from _common import train_argv

    val = lambda a, k: a[a.index(k) + 1]  # noqa: E731
    argv = train_argv(lora, "O")
    assert val(argv, "--lr") == "0.001" and val(argv, "--modules-to-save") == "pooler,classifier"
    assert val(argv, "--pooling") == "mean" and "--no-figures" in argv and val(argv, "--output-dir") == "O"
    # the schedule knobs go to the methods that have a schedule (PEFT's LoRA takes none)
    assert "tinit" not in lora and (ela["tinit"], ela["tfinal"], ela["delta_t"]) == (0.1, 0.2, acc.DELTA_T)
    # the same (task, method, r, seed, steps) under a protocol is another cell, with its own table
    assert acc.cell_key("cola", "elalora", 8, 0, 100) != acc.cell_key("cola", "elalora", 8, 0, 100, "v2")
    recs = [_rec("cola", "elalora", 8, s, 0.1) for s in (0, 1, 2)]
    recs += [{**_rec("cola", "elalora", 8, s, 0.4, steps=535), "protocol": "v2"} for s in (0, 1, 2)]
    t = acc.render_table(recs, tasks=["cola"], methods=["elalora"], rs=[8], seeds=[0, 1, 2], steps=-1,
                         with_extra=False, protocol="v2")
    assert "40.0 ± 0.0" in t and "10.0" not in t and "protocol v2" in t
    assert all(acc.LR_FAMILY[m] in ("lora", "svd") for m in acc.METHODS)


def test_carry_over_copies_only_cells_whose_every_setting_is_identical(acc):
    # v3 differs from v2 only in lr: the LoRA family keeps 1e-3 except on CoLA (v2 had 3e-4 there), the SVD
    # family moves to 3e-3, so only the LoRA cells outside CoLA may carry over
    assert acc.PROTOCOLS["v3"]["lr"] == {"lora": 1e-3, "svd": 3e-3} and "lr_task" not in acc.PROTOCOLS["v3"]
    v2 = acc.PROTOCOLS["v2"]
    steps = {"stsb": 360, "cola": 1605}

    def rec(task, method, seed):
        shared = {**acc.SHARED, "max_steps": steps[task], **acc.cell_settings(task, method, v2),
                  "protocol": "v2", "epochs": v2["epochs"][task]}
        return {**_rec(task, method, 8, seed, 0.8, steps=steps[task]), "protocol": "v2", "shared": shared}

    recs = [rec("stsb", "peft-lora", 0), rec("stsb", "elalora", 0), rec("cola", "peft-lora", 0)]
    tampered = rec("stsb", "peft-lora", 1)
    tampered["shared"]["pooling"] = "cls"  # one knob differs: runs again
    recs.append(tampered)
    todo = [(t, m, 8, s) for t in ("stsb", "cola") for m in ("peft-lora", "elalora") for s in (0, 1)]
    out = acc.carry_over(recs, todo, steps, source="v2", protocol="v3")
    assert [(r["task"], r["method"], r["seed"]) for r in out] == [("stsb", "peft-lora", 0)]
    assert out[0]["protocol"] == "v3" == out[0]["shared"]["protocol"] and out[0]["carried_from"] == "v2"
    assert recs[0]["protocol"] == "v2"  # the source record is not changed
    assert acc.carry_over(recs, todo, {**steps, "stsb": 361}, source="v2", protocol="v3") == []  # other steps


def test_cell_fields_overrides_replace_or_add_fields(acc):
    from _common import train_argv

    val = lambda a, k: a[a.index(k) + 1]  # noqa: E731
    f = acc.cell_fields("stsb", "elalora", 2, 0, 100, "D", 1, overrides={"orth_reg_weight": 0.0, "b": 2})
    assert f["orth_reg_weight"] == 0.0 and f["b"] == 2
    a = train_argv(f, "O")
    assert val(a, "--orth-reg-weight") == "0.0" and a.count("--orth-reg-weight") == 1 and val(a, "--b") == "2"
    assert acc.cell_fields("stsb", "elalora", 2, 0, 100, "D", 1)["orth_reg_weight"] == 0.1
    # the arms' overrides (benchmarks/arms.py) and ORTH_REG: the LoRA-form arms drop the regulariser
    lp = acc.cell_fields("stsb", "elalora-lora-params", 2, 0, 100, "D", 1)
    assert (lp["method"], lp["form"], lp["budget"]) == ("elalora", "lora", "params") and "orth_reg_weight" not in lp
    from elalora.recipe import RunSpec

    RunSpec(**lp)  # every field is a RunSpec field


def test_generation_cells_keep_their_per_method_knobs():
    gen = _load_bench("generation")
    from arms import ARMS

    f = {m: gen.cell_fields(m, 8, 0, "D", "E", 1) for m in gen.METHODS if ARMS[m].recipe}
    assert f["elalora"]["orth_reg_weight"] == 0.1 and f["elalora"]["form"] == "svd"  # the committed arm: the SVD form
    assert f["elalora-lora"]["form"] == "lora" and "orth_reg_weight" not in f["elalora-lora"]
    assert f["elalora-svd-g0"]["form"] == "svd" and "orth_reg_weight" not in f["elalora-svd-g0"]
    assert f["peft-lora"]["method"] == "lora" and "tinit" not in f["peft-lora"]
    assert all(f[m]["eval_file"] == "E" and f[m]["max_steps"] == gen.PROTOCOL["steps"] for m in f)


def test_no_benchmark_imports_the_cli():
    """The benchmarks drive the library through its public recipe (elalora.recipe), never elalora.cli."""
    import ast

    bad = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if isinstance(node, ast.ImportFrom) and node.module == "elalora":
                names += [f"elalora.{a.name}" for a in node.names]
            bad += [f"{path.name}:{node.lineno} imports {n}" for n in names
                    if n == "elalora.cli" or n.startswith("elalora.cli.")]
    assert not bad, "\n".join(bad)


def test_paired_table_hand_computed_interval(acc):
    # ElaLoRA − PEFT LoRA on STS-B over seeds 0, 1, 2: differences 1, 2, 3 (×100 of 0.01, 0.02, 0.03) ->
    # mean 2, sd 1, half-width t(0.975, 2) / sqrt(3) = 4.3027 / 1.7321 = 2.484 -> [-0.5, +4.5], a tie
    recs = [{"task": "stsb", "method": m, "r": 8, "seed": s, "protocol": "v2", "main": v}
            for s, (e, b) in enumerate([(0.81, 0.80), (0.84, 0.82), (0.86, 0.83)])
            for m, v in (("elalora", e), ("peft-lora", b))]
    recs.append({"task": "mrpc", "method": "elalora", "r": 8, "seed": 0, "protocol": "v2", "main": 0.9})
    assert abs(acc.t_quantile(2) - 4.302652729911275) < 1e-9  # scipy double precision, a table value
    table = acc.paired_table(recs, protocol="v2", tasks=["stsb", "mrpc"], baselines=("peft-lora",), rs=(8,))
    row = [ln for ln in table.splitlines() if ln.startswith("| 8 | PEFT LoRA")][0]
    assert "+2.0 [-0.5, +4.5] tie (n=3)" in row and row.rstrip(" |").endswith("pending")
    # a consistent gain is a win once its interval excludes 0
    for rec in recs:
        if rec["method"] == "elalora" and rec["task"] == "stsb":
            rec["main"] = {0: 0.82, 1: 0.84, 2: 0.85}[rec["seed"]]  # diffs 2, 2, 2 -> sd 0
    row = [ln for ln in acc.paired_table(recs, protocol="v2", tasks=["stsb"], baselines=("peft-lora",), rs=(8,))
           .splitlines() if ln.startswith("| 8 |")][0]
    assert "+2.0 [+2.0, +2.0] win (n=3)" in row


def test_paired_table_cross_budget_row(acc):
    # ElaLoRA at r 2 minus PEFT AdaLoRA at r 4 (the paper's claim), seeds 0 and 1: diffs -1, -3 ->
    # mean -2, sd sqrt(2), half-width t(0.975, 1) * sqrt(2) / sqrt(2) = 12.706 -> [-14.7, +10.7], a tie
    recs = [{"task": "stsb", "method": m, "r": r, "seed": s, "protocol": "v2", "main": v}
            for s, (e, a) in enumerate([(0.80, 0.81), (0.80, 0.83)])
            for m, r, v in (("elalora", 2, e), ("peft-adalora", 4, a), ("peft-adalora", 2, 0.5))]
    table = acc.paired_table(recs, protocol="v2", tasks=["stsb"], baselines=("peft-adalora",), rs=(2,))
    same = [ln for ln in table.splitlines() if ln.startswith("| 2 | PEFT AdaLoRA |")][0]
    cross = [ln for ln in table.splitlines() if ln.startswith("| 2 | PEFT AdaLoRA at r = 4 |")][0]
    assert "+30.0 [+30.0, +30.0] win (n=2)" in same
    assert "-2.0 [-14.7, +10.7] tie (n=2)" in cross
    # no r = 2 row asked for: no cross row either
    assert "at r = 4" not in acc.paired_table(recs, protocol="v2", tasks=["stsb"], rs=(8,))


_load_bench = load_benchmark


def test_layer_contribution_render_pairs_top_and_bottom_by_seed():
    lc = _load_bench("layer_contribution")

    def rec(seed, top, bottom, rnd):
        return {"task": "stsb", "seed": seed, "baseline": 0.8 + seed / 100, "summary": [
            {"fraction": 0.1, "group": g, "k": 4, "drop_mean": d, "rank_off_mean": {"top": 40, "random": 30,
                                                                                      "bottom": 10}[g]} for g, d in
            (("top", top), ("bottom", bottom), ("random", rnd))]}

    # top − bottom per seed: 0.03, 0.01, 0.02 (×100: 3, 1, 2) -> mean 2, sd 1 -> [-0.5, +4.5], a tie
    table = lc.render([rec(0, 0.05, 0.02, 0.01), rec(1, 0.02, 0.01, 0.0), rec(2, 0.04, 0.02, 0.02)])
    row = [ln for ln in table.splitlines() if ln.startswith("| STSB")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:5] == ["3", "81.0 ± 1.0", "4 (10%)", "3.7 ± 1.5"]
    assert cells[5] == "1.0 ± 1.0" and cells[6] == "1.7 ± 0.6"
    assert cells[7] == "+2.0 [-0.5, +4.5] tie (n=3)" and cells[8] == "40 / 30 / 10"
    # the control: the same sets in the uniform-rank run; top − bottom there 1, 1, 1 (sd 0: a "win")
    recs = [rec(0, 0.05, 0.02, 0.01), rec(1, 0.02, 0.01, 0.0)]
    for r_, (top, bottom) in zip(recs, ((0.03, 0.02), (0.02, 0.01))):
        r_["control"] = {"baseline": 0.8,
                         "summary": [{"fraction": 0.1, "group": "top", "k": 4, "drop_mean": top},
                                     {"fraction": 0.1, "group": "bottom", "k": 4, "drop_mean": bottom}]}
    row = [ln for ln in lc.render_control(recs, "PEFT LoRA").splitlines() if ln.startswith("| STSB")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:6] == ["2", "4 (10%)", "80.0 ± 0.0", "2.5 ± 0.7", "1.5 ± 0.7"]
    assert cells[6] == "+1.0 [+1.0, +1.0] win (n=2)" and cells[7].startswith("+2.0 [")
    # ElaLoRA's top − bottom (3, 1) minus the control's (1, 1): 2, 0 -> mean 1, se 1, t(1) 12.71
    assert cells[8] == "+1.0 [-11.7, +13.7] tie (n=2)"
    assert lc.render_control([rec(0, 0.05, 0.02, 0.01)], "PEFT LoRA") == ""  # no control: no table


def test_layer_contribution_studies_have_their_own_file_and_block():
    """Each study's file is rewritten whole from its analyses, so two studies must never share one."""
    lc = _load_bench("layer_contribution")
    paths = [lc.study_paths(*s) for s in lc.STUDIES]
    assert paths[0] == (lc.JSONL, "layer-contribution-table")  # the first study keeps its committed file
    assert len({p for p, _ in paths}) == len(paths) and len({b for _, b in paths}) == len(paths)
    f, block = lc.study_paths("v3", "elalora-lora-g1", 8)
    assert f.name == "layer_contribution_v3_elalora-lora-g1_r8.jsonl"
    assert block == "layer-contribution-v3-elalora-lora-g1-r8"


def test_generation_render_untrained_row_and_paired_difference():
    gen = _load_bench("generation")
    name = gen.PROTOCOL["name"]

    def rec(method, seed, bleu, rouge):
        return {"protocol": name, "method": method, "seed": seed, "final": {"bleu": bleu, "rougeL": rouge},
                "rank_pattern": {"a": 8, "b": 8} if method != "untrained" else None}

    recs = [rec("untrained", 0, 5.0, 20.0)]
    recs += [rec("peft-lora", s, b, 50.0) for s, b in enumerate((60.0, 62.0, 64.0))]
    recs += [rec("elalora", s, b, 50.0) for s, b in enumerate((61.0, 64.0, 67.0))]  # diffs 1, 2, 3
    recs.append({**rec("peft-lora", 0, 99.0, 99.0), "protocol": "other"})  # another protocol: ignored
    table = gen.render(recs)
    rows = {ln.split("|")[1].strip(): ln for ln in table.splitlines() if ln.startswith("| ")}
    assert "| 62.0 ± 2.0 | 50.0 ± 0.0 | +2.0 [-0.5, +4.5] tie (n=3) |" in rows["PEFT LoRA"]
    assert "| 1 | 5.0 | 20.0 |" in rows["untrained SmolLM2-135M"]  # one deterministic score
    assert "+59.0 [" in rows["untrained SmolLM2-135M"]  # ElaLoRA seeds minus the one untrained score
    assert "| 0 | pending |" in rows["PEFT AdaLoRA"]


def test_lr_select_split_is_a_seeded_partition_of_the_training_file(tmp_path):
    from conftest import missing_data, shared_data_dir
    from elalora.tasks import load_task_data
    from elalora.tasks import glue_layout

    glue = shared_data_dir() / "glue"
    if not (glue / "MRPC" / "train.tsv").is_file():
        pytest.skip(missing_data("glue/MRPC"))
    sel = _load_bench("lr_select")
    for task in ("mrpc", "cola"):  # a BOM and a header; no header
        n_in, n_out = sel.write_split(glue, tmp_path / "a", task)
        full, _, _ = load_task_data(task, str(glue), seed=0)
        tr, dev, _ = load_task_data(task, str(tmp_path / "a"), seed=0)
        assert (len(tr), len(dev)) == (n_in, n_out) and n_in + n_out == len(full)
        assert abs(n_out - 0.2 * len(full)) <= 1
        key = lambda e: json.dumps(e, sort_keys=True, default=str)  # noqa: E731
        assert sorted(map(key, tr + dev)) == sorted(map(key, full))  # a partition, parsed as the original
        sel.write_split(glue, tmp_path / "b", task)
        folder = glue_layout(task)[0]
        assert (tmp_path / "a" / folder / "dev.tsv").read_bytes() == \
            (tmp_path / "b" / folder / "dev.tsv").read_bytes()  # same seed, same split
    assert glue_layout("cola") == ("CoLA", False) and glue_layout("stsb") == ("STS-B", True)
    with pytest.raises(ValueError, match="unknown GLUE task"):
        glue_layout("stsbb")


def test_provenance_names_the_commit_and_the_package_versions(acc, monkeypatch):
    """Every accuracy record carries the commit it ran from and the versions that can move its numbers."""
    import shutil
    import subprocess
    from importlib import metadata

    from _records import PROVENANCE_PACKAGES, provenance

    p = provenance()
    assert set(p["versions"]) == set(PROVENANCE_PACKAGES)
    assert p["versions"]["torch"] == metadata.version("torch") and p["versions"]["peft"] == metadata.version("peft")
    if shutil.which("git") and (ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        assert p["commit"] == head and isinstance(p["dirty"], bool)
    else:
        assert p["commit"] is None and p["dirty"] is None
    # run_cell writes it into every record (the training itself stubbed out)
    monkeypatch.setattr(acc, "run_recipe_cell", lambda *a, **k: {"final": {"f1": 0.5}, "main_metric": "f1"})
    rec = acc.run_cell("mrpc", "elalora-lora", 8, 0, 10, None, 1, protocol="v3")
    assert rec["main"] == 0.5 and rec["provenance"]["versions"] == p["versions"]


def test_one_arms_table_serves_every_benchmark_and_every_record(acc):
    """benchmarks/arms.py is the one table of arms: every script's arms and every committed record's arm are in it,
    each recipe arm is a valid RunSpec, and a study's own label differs only where its protocol changes it."""
    from arms import ARMS, LR_FAMILIES, label, live

    from _records import read_records
    from elalora.recipe import RunSpec

    gen, pr, rep, sel = (_load_bench(n) for n in ("generation", "planted_rank", "report", "lr_select"))
    used = {*acc.METHODS, *gen.METHODS, *pr.METHODS, *rep.GRID_ARMS, *rep.LONG_METHODS, *sel.FAMILY_METHOD.values(),
            *rep.PLANTED_RETIRED, "untrained"}
    assert used <= set(ARMS), used - set(ARMS)
    for f in sorted((ROOT / "benchmarks" / "results").glob("*.jsonl")):
        methods = {r["method"] for r in read_records(f) if r.get("method")}
        if f.name.startswith("protocol_"):
            continue  # the protocol study names recipe methods, not arms (docs/protocol_study.md)
        assert methods <= set(ARMS), (f.name, methods - set(ARMS))
    for name, arm in ARMS.items():
        assert arm.name == name and arm.lr_family in LR_FAMILIES and arm.label
        if arm.recipe:
            RunSpec(task="rte", method=arm.method, r=2, **arm.overrides)
    assert acc.LR_FAMILY["elalora-lora-g1"] == "lora" and acc.LR_FAMILY["elalora"] == "svd"
    # labels: the grid's, and a study's own where its protocol differs (the planted study runs PEFT's γ 0.5)
    assert label("elalora") == "ElaLoRA (ours)" and label("elalora", "planted") == "ElaLoRA (ours, SVD form, γ = 0)"
    assert label("peft-adalora", "e2e") == "PEFT AdaLoRA" and label("not-an-arm") == "not-an-arm"
    # retired arms (a fixed bug) leave the live tables
    assert live(["elalora-lora-g1", "elalora-lora-g1-skip1"]) == ["elalora-lora-g1"]
    assert "elalora-lora-g1-skip1" not in rep.GRID_METHODS and "elalora-lora-g1-skip1" in rep.GRID_ARMS
    with pytest.raises(TypeError):
        ARMS["elalora"].overrides["form"] = "lora"  # the table is data: read-only


def test_planted_arms_build_the_configs_their_names_say():
    """The planted-rank study builds its students from the arms table: the overrides reach the method's config."""
    import torch

    pr = _load_bench("planted_rank")
    from transformers import BertConfig, BertModel

    base = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=16), add_pooling_layer=False)
    names = pr.target_names(base)
    vb = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4, dtype=torch.long)}

    def config(method):
        out = pr.build_student(method, base, names, r=2, cap=4, steps=20, seed=0, plan_batches=[], val_batch=vb)
        return out[3], out[4]().get("method_config") or {}

    gamma, cfg = config("elalora")
    assert gamma == 0.0 and cfg["form"] == "svd" and cfg["grace_rounds"] == 0
    gamma, cfg = config("elalora-orth")
    assert gamma == pytest.approx(0.1) and cfg["form"] == "svd"
    gamma, cfg = config("elalora-lora-g1")
    assert gamma == 0.0 and (cfg["form"], cfg["grace_rounds"]) == ("lora", 1)
    assert config("peft-adalora")[0] == pytest.approx(0.5) and config("peft-adalora-noorth")[0] == 0.0
    assert config("adalora-orth")[0] == pytest.approx(0.1) and config("adalora")[1]["form"] == "svd"


def test_benchmarks_use_only_the_public_api():
    """No benchmark imports a private name or module of the library, or builds the recipe's Built by hand."""
    import ast

    bad = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("elalora"):
                parts = node.module.split(".") + [a.name for a in node.names]
                bad += [f"{path.name}:{node.lineno} imports {node.module}.{p}" for p in parts if p.startswith("_")]
                if node.module == "elalora.tasks.sources":
                    bad.append(f"{path.name}:{node.lineno} imports elalora.tasks.sources")
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "Built":
                bad.append(f"{path.name}:{node.lineno} builds recipe.Built by hand (use Built.from_peft_model)")
    assert not bad, "\n".join(bad)


def test_stats_interval_by_hand():
    """_stats: the interval is mean ± t(0.975, n−1)·sd/√n (hand-computed), one value has no interval."""
    import math

    from _stats import interval, mean_sd, paired_cell

    mu, lo, hi = interval([1.0, 2.0, 3.0])
    assert mu == 2.0 and abs((hi - mu) - 4.302652729911275 / math.sqrt(3)) < 1e-9 and lo == pytest.approx(4 - hi)
    assert math.isnan(interval([1.0])[1]) and paired_cell([1.5]) == "+1.5 (1 seed)"
    assert mean_sd([4.0]) == (4.0, 0.0) and mean_sd([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
