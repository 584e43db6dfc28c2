"""Hostile input, organised by surface (files, API, CLI): the reproducers of the adversarial audit
(issue 16, docs/reliability.md). Every case asserts a clear error or correct behaviour, and that
nothing was lost or half-written. Tiny models only; cases that could allocate a lot assert that
the error comes before the allocation (the model is left unwrapped).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import elalora
from elalora import ConfigError, TargetModuleError
from elalora.layers import ElasticAdapter
from elalora.model import TrainingDivergedError
from elalora.persistence import (AdapterLoadError, OutputLockedError, OutputPathError, output_lock,
                                 recover_interrupted_swap)

from conftest import minilm_path, tiny_bert


def _adapted(model) -> int:
    return sum(isinstance(m, ElasticAdapter) for m in model.modules())


def _handle(seed=0, **kw):
    # the SVD form: several tests below reach into its P / λ / Q
    cfg = dict(r=2, form="svd", b=1, modules_to_save=["classifier"], total_steps=20, tinit=2, tfinal=2, delta_t=2)
    cfg.update(kw)
    return elalora.get_model(tiny_bert(seed=seed), elalora.ElaLoRAConfig(**cfg))


def _tree(p: Path) -> dict[str, bytes]:
    return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()}


# ============================================================================================ files
def test_save_refuses_an_existing_file(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("precious")
    h = _handle()
    for save in (h.save_pretrained, h.export_peft):
        with pytest.raises(OutputPathError, match="existing file"):
            save(f)
        assert f.read_text() == "precious"


@pytest.mark.parametrize("how", ["save_pretrained", "export_peft"])
def test_save_keeps_unrelated_files_of_the_directory(tmp_path, how):
    d = tmp_path / "mine"
    (d / "sub").mkdir(parents=True)
    (d / "notes.txt").write_text("keep me")
    (d / "sub" / "data.bin").write_bytes(b"\x00\x01")
    h = _handle()
    getattr(h, how)(d)
    assert (d / "notes.txt").read_text() == "keep me" and (d / "sub" / "data.bin").read_bytes() == b"\x00\x01"
    assert (d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file()
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no temporary left
    getattr(h, how)(d)  # again: our files replaced, the user's still there
    assert (d / "notes.txt").read_text() == "keep me"
    if how == "save_pretrained":
        elalora.load_adapter(tiny_bert(), d)


def test_interrupted_swap_is_restored_on_next_load_and_save(tmp_path, monkeypatch):
    h = _handle()
    h.save_pretrained(tmp_path / "ela")
    before = _tree(tmp_path / "ela")
    import elalora.persistence as P

    real, calls = os.replace, []

    def crash_after_first(a, b):
        if Path(a).is_dir():  # the directory swap's two renames (the files written inside it are atomic too)
            calls.append((a, b))
            if len(calls) == 2:
                raise KeyboardInterrupt("simulated crash between the two renames")
        return real(a, b)

    monkeypatch.setattr(P.os, "replace", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        h.save_pretrained(tmp_path / "ela")
    monkeypatch.setattr(P.os, "replace", real)
    assert not (tmp_path / "ela").exists()  # the state a real crash leaves
    assert [p.name.startswith(".ela.old-") for p in tmp_path.iterdir()] == [True]
    with pytest.warns(RuntimeWarning, match="restored"):
        h2 = elalora.load_adapter(tiny_bert(), tmp_path / "ela")
    assert _tree(tmp_path / "ela") == before and h2.rank_pattern() == h.rank_pattern()
    # the same crash, then a save: the old contents come back first, then are replaced normally
    calls.clear()
    monkeypatch.setattr(P.os, "replace", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        h.save_pretrained(tmp_path / "ela")
    monkeypatch.setattr(P.os, "replace", real)
    with pytest.warns(RuntimeWarning, match="restored"):
        h.save_pretrained(tmp_path / "ela")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ela"]
    assert recover_interrupted_swap(tmp_path / "ela") is None


def test_saved_directories_are_not_private(tmp_path):
    old = os.umask(0o022)
    try:
        _handle().save_pretrained(tmp_path / "ela")
    finally:
        os.umask(old)
    assert (tmp_path / "ela").stat().st_mode & 0o777 == 0o755  # mkdtemp alone gives 0700


def test_nan_weights_are_never_saved_and_never_loaded(tmp_path):
    h = _handle()
    h.save_pretrained(tmp_path / "ok")
    with torch.no_grad():
        h.adapters[3].lora_P.fill_(float("nan"))
    for save in (h.save_pretrained, h.export_peft):
        with pytest.raises(TrainingDivergedError, match="NaN"):
            save(tmp_path / "nan")
    assert not (tmp_path / "nan").exists()
    from safetensors.torch import load_file, save_file

    f = tmp_path / "ok" / "adapter_model.safetensors"
    t = load_file(f)
    k = next(iter(t))
    t[k] = torch.full_like(t[k], float("inf"))
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(AdapterLoadError, match="NaN or inf"):
        elalora.load_adapter(tiny_bert(), tmp_path / "ok")


def _edit(path: Path, fn) -> None:
    p = path / "adapter_config.json"
    cfg = json.loads(p.read_text())
    fn(cfg)
    p.write_text(json.dumps(cfg))


def _first(cfg):
    return cfg["modules"][next(iter(cfg["modules"]))]


EDITS = {
    "capacity 10**7": (lambda c: _first(c).update(capacity=10**7), "capacity 10000000 exceeds"),
    "rank above capacity": (lambda c: _first(c).update(rank=_first(c)["capacity"] + 1), "rank must be"),
    "negative rank": (lambda c: _first(c).update(rank=-1), "rank must be"),
    "missing key": (lambda c: _first(c).pop("form"), "missing form"),
    "non-numeric scale": (lambda c: _first(c).update(scaling="big"), "scaling must be a finite number"),
    "nan scale": (lambda c: _first(c).update(scaling=float("nan")), "scaling must be a finite number"),
    "unknown form": (lambda c: _first(c).update(form="dora"), "form must be"),
    "modules not an object": (lambda c: c.update(modules=[]), "'modules' must be"),
    "bad config field": (lambda c: c["config"].update(b="four"), "config: b .* must be an integer"),
    "bad history": (lambda c: c.update(events=[{"step": 1}]), "rank change 1: missing module"),
    "module entry removed": (lambda c: c["modules"].pop(next(iter(c["modules"]))), "does not list"),
}


@pytest.mark.parametrize("case", sorted(EDITS))
def test_hand_edited_adapter_config_fails_before_touching_the_model(tmp_path, case):
    h = _handle()
    h.save_pretrained(tmp_path / "ela")
    edit, message = EDITS[case]
    _edit(tmp_path / "ela", edit)
    fresh = tiny_bert()
    with pytest.raises(AdapterLoadError, match=message):
        elalora.load_adapter(fresh, tmp_path / "ela")
    assert _adapted(fresh) == 0 and getattr(fresh, "_elalora_handle", None) is None


def test_leftover_tensor_in_weights_fails(tmp_path):
    from safetensors.torch import load_file, save_file

    _handle().save_pretrained(tmp_path / "ela")
    f = tmp_path / "ela" / "adapter_model.safetensors"
    t = load_file(f)
    t["bert.encoder.layer.9.attention.self.query.lora_Q"] = torch.zeros(2, 32)
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(AdapterLoadError, match="does not list"):
        elalora.load_adapter(tiny_bert(), tmp_path / "ela")


def test_wrong_base_model_of_the_same_shapes(tmp_path):
    h = _handle(seed=0)
    h.save_pretrained(tmp_path / "ela")
    other = tiny_bert(seed=1)  # same architecture and shapes, other weights
    with pytest.raises(AdapterLoadError, match="not the base model this adapter was trained on"):
        elalora.load_adapter(other, tmp_path / "ela")
    assert _adapted(other) == 0
    elalora.load_adapter(tiny_bert(seed=1), tmp_path / "ela", check_base_model=False)  # the override
    # the same base in bf16 still counts as the same model
    elalora.load_adapter(tiny_bert(seed=0).to(torch.bfloat16), tmp_path / "ela")


def test_truncated_weights(tmp_path):
    _handle().save_pretrained(tmp_path / "ela")
    f = tmp_path / "ela" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(AdapterLoadError, match="truncated or corrupt"):
        elalora.load_adapter(tiny_bert(), tmp_path / "ela")


def test_adapter_config_that_is_not_an_object(tmp_path):
    _handle().save_pretrained(tmp_path / "ela")
    (tmp_path / "ela" / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(AdapterLoadError, match="not a JSON object"):
        elalora.load_adapter(tiny_bert(), tmp_path / "ela")


def test_output_lock_is_exclusive_and_survives_a_dead_holder(tmp_path):
    out = tmp_path / "run"
    with output_lock(out):
        with pytest.raises(OutputLockedError, match="another elalora process"):
            with output_lock(out):
                pass
    assert not (tmp_path / ".run.lock").exists()
    # a holder killed with SIGKILL leaves the file but no lock: the next job takes over
    code = f"import os, sys; sys.path.insert(0, {str(Path(elalora.__file__).parents[1])!r})\n" \
           f"from elalora.persistence import output_lock\n" \
           f"cm = output_lock({str(out)!r}); cm.__enter__(); os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert (tmp_path / ".run.lock").exists()
    with output_lock(out):
        pass


# ============================================================================================== API
def test_rank_larger_than_the_matrix_fails_before_allocation():
    model = tiny_bert()  # 32-wide matrices
    for cfg in (elalora.ElaLoRAConfig(r=100_000, b=1), elalora.ElaLoRAConfig(r=20, b=1),  # capacity 40 > 32
                elalora.AdaLoRAConfig(r=30, init_r=45), elalora.ALoRAConfig(r=33)):
        with pytest.raises(ConfigError, match="exceeds its matrix size"):
            elalora.get_model(model, cfg)
        assert _adapted(model) == 0 and getattr(model, "_elalora_handle", None) is None
    elalora.get_model(model, elalora.ElaLoRAConfig(r=16, b=1))  # capacity 32 = min(d_in, d_out) fits


@pytest.mark.parametrize("field", ["lora_alpha", "orth_reg_weight"])
def test_infinite_scales_rejected(field):
    with pytest.raises(ConfigError, match=f"{field} must be .* finite"):
        elalora.ElaLoRAConfig(r=2, **{field: float("inf")})


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 2)


def test_unsupported_or_unmatched_target_modules_fail():
    with pytest.raises(TargetModuleError, match=r"conv \(Conv2d\)"):
        elalora.get_model(ConvNet(), elalora.ALoRAConfig(r=2, target_modules=["conv", "fc", "fc2"]))
    with pytest.raises(TargetModuleError, match="fc3"):
        elalora.get_model(ConvNet(), elalora.ALoRAConfig(r=2, target_modules=["fc", "fc3"]))
    h = elalora.get_model(ConvNet(), elalora.ALoRAConfig(r=2, max_rank=2, target_modules=["fc", "fc2"]))
    assert h.names == ["fc", "fc2"]


def _one_step(model, t=0):
    g = torch.Generator().manual_seed(t)
    x = torch.randint(0, 100, (4, 8), generator=g)
    return model(input_ids=x, labels=(x[:, 0] > 50).long()).loss


def test_step_without_gradients_changes_no_rank():
    h = _handle()
    opt = torch.optim.SGD([p for p in h.model.parameters() if p.requires_grad], lr=0.0)
    h.model.train()
    for t in range(18):  # the scored phases (the last tfinal=2 steps use no scores)
        _one_step(h.model, t).backward()
        opt.step()
        opt.zero_grad()  # wrong order: the gradients are gone before handle.step
        with pytest.warns(RuntimeWarning, match="no gradient"):
            assert h.step(opt) == []
    assert h.events == [] and h.num_steps_without_grad > 0


def test_step_after_zeroed_gradients_skips_the_rounds():
    h = _handle()
    opt = torch.optim.SGD([p for p in h.model.parameters() if p.requires_grad], lr=0.0)
    h.model.train()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for t in range(20):
            _one_step(h.model, t).backward()
            opt.step()
            opt.zero_grad(set_to_none=False)  # zeros, not None
            h.step(opt)
    assert h.events == []
    assert any("every importance score is 0" in str(x.message) for x in w)


def test_diverged_plain_loop_stops_naming_the_step():
    h = _handle()
    opt = torch.optim.SGD([p for p in h.model.parameters() if p.requires_grad], lr=1e-3)
    h.model.train()
    for t in range(3):
        _one_step(h.model, t).backward()
        opt.step()
        h.step(opt)
        opt.zero_grad()
    with torch.no_grad():
        h.adapters[0].lora_Q.add_(float("inf"))  # what a huge learning rate does
    _one_step(h.model, 3).backward()
    opt.step()
    with pytest.raises(TrainingDivergedError, match="diverged at step 3.*[Ll]ower the learning rate"):
        h.step(opt)


def test_merge_and_unload_then_unmerge_and_export(tmp_path):
    h = _handle()
    with torch.no_grad():
        for a in h.adapters:
            a.lora_lambda.add_(0.1)
    h.export_peft(tmp_path / "before")
    h.merge_and_unload()
    with pytest.raises(RuntimeError, match="nothing to unmerge"):
        h.unmerge()
    h.export_peft(tmp_path / "after")  # the factors are intact: same export
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / "before" / "adapter_model.safetensors"),
            load_file(tmp_path / "after" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_failed_load_checkpoint_changes_nothing(tmp_path):
    h = _handle()
    params = [p for p in h.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    h.model.train()
    for t in range(6):
        _one_step(h.model, t).backward()
        opt.step()
        h.step(opt)
        opt.zero_grad()
    elalora.save_checkpoint(tmp_path / "ck.pt", h, opt)

    h2 = _handle(seed=0)
    p2 = [p for p in h2.model.parameters() if p.requires_grad]
    wrong_opt = torch.optim.AdamW([{"params": p2[:3]}, {"params": p2[3:]}], lr=1e-2)  # another layout
    before = {k: v.clone() for k, v in h2.model.state_dict().items()}
    state_before = (h2.step_count, [a.active.clone() for a in h2.adapters], len(h2.events))
    with pytest.raises(AdapterLoadError, match="optimizer"):
        elalora.load_checkpoint(tmp_path / "ck.pt", h2, wrong_opt)
    assert (h2.step_count, len(h2.events)) == (state_before[0], state_before[2])
    assert all(torch.equal(a.active, m) for a, m in zip(h2.adapters, state_before[1]))
    assert all(torch.equal(v, before[k]) for k, v in h2.model.state_dict().items())


def test_trainer_resume_from_a_checkpoint_outside_output_dir(tmp_path):
    import shutil

    from test_trainer import Toy, _args
    from transformers import Trainer

    def run(resume=None):
        model = tiny_bert()
        h = elalora.get_model(model, elalora.ElaLoRAConfig(r=3, b=2, k=2, tinit=2, tfinal=2, delta_t=2,
                                                             modules_to_save=["classifier"]))
        args = _args(tmp_path, num_train_epochs=1, save_strategy="steps", save_steps=4, logging_steps=100)
        trainer = Trainer(model=model, args=args, train_dataset=Toy())
        h.callback().attach(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return h

    full = run()
    moved = tmp_path / "elsewhere" / "ckpt"
    shutil.copytree(tmp_path / "out" / "checkpoint-4", moved)
    shutil.rmtree(tmp_path / "out")
    res = run(resume=str(moved))
    assert [e.to_dict() for e in res.events] == [e.to_dict() for e in full.events]


# ============================================================================================== CLI
needs_minilm = pytest.mark.skipif(minilm_path() is None, reason="the MiniLM tokenizer is not installed")
TINY = ["--max-train-samples", "24", "--max-eval-samples", "8", "--max-steps", "4", "--batch-size", "8",
        "--max-length", "24", "--no-figures", "--threads", "1"]
WORDS = "the cat dog sat on mat a big small red blue green house tree ran fast".split()


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    if minilm_path() is None:
        pytest.skip("the MiniLM tokenizer is not installed")
    from transformers import AutoTokenizer, BertConfig, BertModel

    root = tmp_path_factory.mktemp("hostile")
    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    for name, seed in (("bert", 0), ("bert_other", 1)):
        torch.manual_seed(seed)
        BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=37, max_position_embeddings=64)).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    rng = random.Random(0)

    def sent():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))

    d = root / "glue" / "RTE"
    d.mkdir(parents=True)
    for f, n in (("train.tsv", 30), ("dev.tsv", 12)):
        rows = [f"{i}\t{sent()}\t{sent()}\t{rng.choice(['entailment', 'not_entailment'])}" for i in range(n)]
        (d / f).write_text("index\tsentence1\tsentence2\tlabel\n" + "\n".join(rows) + "\n")
    d = root / "one_class"
    d.mkdir()
    (d / "train.csv").write_text("text,label\n" + "\n".join(f"{sent()},pos" for _ in range(20)) + "\n")
    (d / "dev.csv").write_text("text,label\n" + "\n".join(f"{sent()},{rng.choice(['pos', 'neg'])}" for _ in range(10))
                               + "\n")
    return root


def _cli(*argv):
    from elalora.cli.main import main

    return main(list(argv))


def _train(fx, out, *extra, model="bert"):
    return _cli("train", "--task", "rte", "--data-dir", str(fx / "glue"), "--model", str(fx / model),
                "--output-dir", str(out), *TINY, *extra)


def _one_line(capsys, rc):
    """Exit code 2, no traceback, exactly one error line (progress lines may precede it)."""
    cap = capsys.readouterr()
    assert rc == 2, cap.err
    lines = cap.err.replace("\r", "\n").splitlines()  # a progress bar may share the error's line
    errors = [x[x.index("elalora"):] for x in lines if "elalora" in x and ": error: " in x]
    assert "Traceback" not in cap.err and len(errors) == 1, cap.err
    return errors[0]


@pytest.fixture(scope="module")
def run_dir(fx, tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile_runs") / "run"
    torch.set_num_threads(1)
    assert _train(fx, out, "--method", "elalora", "--r", "2") == 0
    return out


@needs_minilm
@pytest.mark.parametrize("flag,value", [("--lr", "inf"), ("--lr", "nan"), ("--epochs", "inf"), ("--seed", "-1"),
                                        ("--weight-decay", "inf"), ("--orth-reg-weight", "inf"), ("--beta1", "1.5"),
                                        ("--delta-t", "nan"), ("--threads", "100000")])
def test_non_finite_and_out_of_range_flags_rejected_at_parse_time(fx, tmp_path, capsys, flag, value):
    line = _one_line(capsys, _train(fx, tmp_path / "out", flag, value))
    assert flag in line
    assert not (tmp_path / "out").exists()


@needs_minilm
def test_overwrite_never_deletes_the_model_folder(fx, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(fx / "bert", model)
    before = _tree(model)
    rc = _cli("train", "--task", "rte", "--data-dir", str(fx / "glue"), "--model", str(model), "--output-dir",
              str(model), "--overwrite", *TINY)
    assert "input --model" in _one_line(capsys, rc)
    # another HF model folder (has a config.json, is no run) is refused as well
    rc = _train(fx, model, "--overwrite")
    assert "does not hold an elalora run" in _one_line(capsys, rc)
    assert _tree(model) == before


@needs_minilm
def test_export_over_its_own_run_is_refused(run_dir, tmp_path, capsys):
    before = _tree(run_dir)
    for out in (run_dir, run_dir.parent):
        rc = _cli("export", "--adapter", str(run_dir), "--to", "peft", "--output-dir", str(out), "--overwrite")
        _one_line(capsys, rc)
    assert _tree(run_dir) == before
    # an earlier export may be replaced; a folder of other files may not
    assert _cli("export", "--adapter", str(run_dir), "--to", "peft", "--output-dir", str(tmp_path / "x")) == 0
    assert _cli("export", "--adapter", str(run_dir), "--to", "peft", "--output-dir", str(tmp_path / "x"),
                "--overwrite") == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("mine")
    capsys.readouterr()
    rc = _cli("export", "--adapter", str(run_dir), "--to", "merged", "--output-dir", str(tmp_path / "mine"),
              "--overwrite")
    assert "did not write" in _one_line(capsys, rc)
    assert (tmp_path / "mine" / "keep.txt").read_text() == "mine"


@needs_minilm
def test_concurrent_train_into_the_same_directory(fx, tmp_path, capsys):
    out = tmp_path / "run"
    with output_lock(out):  # what a first `train` holds while it runs
        line = _one_line(capsys, _train(fx, out))
    assert "another elalora process" in line and not out.exists()


@needs_minilm
@pytest.mark.parametrize("extra,message", [(["--r", "100000"], "exceeds its matrix size"),
                                           (["--r", "20"], "exceeds its matrix size"),
                                           (["--max-length", "4000"], "exceeds the 64 positions")])
def test_sizes_checked_before_training(fx, tmp_path, capsys, extra, message):
    args = TINY
    if "--max-length" in extra:
        i = TINY.index("--max-length")
        args = TINY[:i] + TINY[i + 2:]
    rc = _cli("train", "--task", "rte", "--data-dir", str(fx / "glue"), "--model", str(fx / "bert"),
              "--output-dir", str(tmp_path / "out"), *args, *extra)
    assert message in _one_line(capsys, rc)
    assert not (tmp_path / "out").exists()


@needs_minilm
def test_plan_rank_bound(fx, tmp_path, capsys):
    rc = _cli("plan", "--task", "rte", "--data-dir", str(fx / "glue"), "--model", str(fx / "bert"), "--r", "100000",
              "--gelora-samples", "8", "--threads", "1")
    assert "--r 100000" in _one_line(capsys, rc)


@needs_minilm
def test_diverged_training_writes_nothing(fx, tmp_path, capsys):
    rc = _train(fx, tmp_path / "out", "--method", "elalora", "--r", "2", "--lr", "1e6", "--warmup-ratio", "0",
                "--logging-steps", "1")
    line = _one_line(capsys, rc)
    assert "diverged at step" in line and "learning rate" in line
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


@needs_minilm
def test_single_class_training_file(fx, tmp_path, capsys):
    rc = _cli("train", "--task", "custom", "--data-dir", str(fx / "one_class"), "--model", str(fx / "bert"),
              "--output-dir", str(tmp_path / "out"), *TINY)
    assert "single class" in _one_line(capsys, rc)


@needs_minilm
def test_eval_output_on_a_read_only_location_fails_before_evaluating(run_dir, capsys, monkeypatch):
    import elalora.recipe.evaluation as R  # where elalora eval's evaluation runs

    called = []
    monkeypatch.setattr(R, "evaluate_model", lambda *a, **k: called.append(1) or {})
    target = "/sys/elalora-hostile/metrics.json" if os.path.isdir("/sys") else "/proc/x/metrics.json"
    line = _one_line(capsys, _cli("eval", "--adapter", str(run_dir), "--output", target))
    assert "not writable" in line and not called
    line = _one_line(capsys, _cli("eval", "--adapter", str(run_dir),
                                  "--output", str(run_dir / "adapter" / "adapter_config.json")))
    assert "file of the adapter" in line


@needs_minilm
def test_eval_of_broken_adapters_is_one_line(run_dir, fx, tmp_path, capsys):
    import shutil

    for sub, edit in (("adapter", lambda c: _first(c).update(rank=10**6)),
                      ("adapter", lambda c: _first(c).update(scaling="x")),
                      ("peft", None)):
        d = tmp_path / f"copy-{sub}"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(run_dir / sub, d)
        if edit is None:  # truncated PEFT weights
            f = d / "adapter_model.safetensors"
            f.write_bytes(f.read_bytes()[:-64])
        else:
            _edit(d, edit)
        _one_line(capsys, _cli("eval", "--adapter", str(d), "--task", "rte", "--data-dir", str(fx / "glue"),
                               "--model", str(fx / "bert"), "--max-eval-samples", "4"))
    # the same shapes, another model: elalora adapter and its PEFT export both refuse
    for sub in ("adapter", "peft"):
        line = _one_line(capsys, _cli("eval", "--adapter", str(run_dir / sub), "--model", str(fx / "bert_other"),
                                      "--max-eval-samples", "4"))
        assert "not the base model" in line


@needs_minilm
def test_cli_restores_a_run_whose_swap_was_interrupted(run_dir, tmp_path, capsys):
    import shutil

    shutil.copytree(run_dir, tmp_path / ".r.old-00000000000000000001-1-abcdef")  # what the crash leaves
    with pytest.warns(RuntimeWarning, match="restored"):
        assert _cli("inspect", str(tmp_path / "r")) == 0
    assert (tmp_path / "r" / "adapter" / "adapter_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


# ============================================== issue 38: every reader as strict as loading (exit 2, one line)
@pytest.fixture(scope="module")
def svd_params_run(fx, tmp_path_factory):
    """The other form and the other budget (run_dir is the LoRA form under the rank budget)."""
    out = tmp_path_factory.mktemp("hostile_runs_svd") / "run"
    torch.set_num_threads(1)
    assert _train(fx, out, "--method", "elalora", "--r", "2", "--form", "svd", "--budget", "params") == 0
    return out


def _other_form(c):
    return "svd" if c["config"]["form"] == "lora" else "lora"


CLI_EDITS = {
    "rank -1": (lambda c: _first(c).update(rank=-1), "rank"),
    "rank above capacity": (lambda c: _first(c).update(rank=_first(c)["capacity"] + 1), "rank"),
    "capacity below rank": (lambda c: _first(c).update(capacity=1, rank=2), "rank"),
    "capacity 10^6": (lambda c: _first(c).update(capacity=10**6), "capacity"),
    "form foo": (lambda c: c["config"].update(form="foo"), "form"),
    "module form foo": (lambda c: _first(c).update(form="foo"), "form"),
    "form disagrees with the tensors": (lambda c: c["config"].update(form=_other_form(c)), "form"),
    "module entry missing": (lambda c: c["modules"].pop(next(iter(c["modules"]))), "does not list"),
    "budget foo": (lambda c: c["config"].update(budget="foo"), "budget"),
    "grace -1": (lambda c: c["config"].update(grace_rounds=-1), "grace_rounds"),
    "grace 'x'": (lambda c: c["config"].update(grace_rounds="x"), "grace_rounds"),
    "event rank -7": (lambda c: c.update(events=[{"step": 1, "module": next(iter(c["modules"])), "old_rank": 1,
                                                  "new_rank": -7}]), "new_rank"),
    "scaling string": (lambda c: _first(c).update(scaling="x"), "scaling"),
}


def _copy_run(run, tmp_path) -> Path:
    import shutil

    d = tmp_path / "run"
    shutil.copytree(run, d)
    return d


def _readers(fx, d):
    """Every command that reads an adapter (or the run around it), as argv lists."""
    data = ["--task", "rte", "--data-dir", str(fx / "glue"), "--model", str(fx / "bert"), "--max-eval-samples", "4"]
    return {"inspect": ["inspect", str(d / "adapter")],
            "eval": ["eval", "--adapter", str(d / "adapter"), *data],
            "export": ["export", "--adapter", str(d / "adapter"), "--to", "peft", "--output-dir", str(d.parent / "x")],
            "plot": ["plot", str(d)],
            "analyze": ["analyze", str(d), "--fractions", "0.5", "--random-draws", "1", "--no-figure", *data]}


@needs_minilm
@pytest.mark.parametrize("run", ["run_dir", "svd_params_run"])
@pytest.mark.parametrize("case", sorted(CLI_EDITS))
def test_every_reader_refuses_a_hostile_adapter_with_one_line(request, fx, tmp_path, capsys, run, case):
    d = _copy_run(request.getfixturevalue(run), tmp_path)
    edit, field = CLI_EDITS[case]
    _edit(d / "adapter", edit)
    before = _tree(d)
    for cmd, argv in _readers(fx, d).items():
        line = _one_line(capsys, _cli(*argv))
        assert field in line, (cmd, line)
    assert _tree(d) == before and not (d.parent / "x").exists()


@needs_minilm
@pytest.mark.parametrize("run", ["run_dir", "svd_params_run"])
def test_an_adapter_config_without_its_form_key_works_everywhere(request, fx, tmp_path, capsys, run):
    d = _copy_run(request.getfixturevalue(run), tmp_path)
    form = json.loads((d / "adapter" / "adapter_config.json").read_text())["config"]["form"]
    _edit(d / "adapter", lambda c: c["config"].pop("form"))
    argv = _readers(fx, d)
    assert _cli(*argv["inspect"], "--json") == 0
    assert json.loads(capsys.readouterr().out)["form"] == form
    assert _cli(*argv["eval"]) == 0
    assert _cli(*argv["export"]) == 0 and (d.parent / "x" / "adapter_config.json").is_file()


RUN_FILE_EDITS = {
    "rank_history new_rank -7": ("rank_history.jsonl", "lines", lambda ev, mod: ev.append(
        {"step": 2, "module": mod, "old_rank": 2, "new_rank": -7}), "new_rank"),
    "rank_history above capacity": ("rank_history.jsonl", "lines", lambda ev, mod: ev.append(
        {"step": 2, "module": mod, "old_rank": 2, "new_rank": 10**6}), "capacity"),
    "rank_history not JSON": ("rank_history.jsonl", "text", lambda t: t + "{not json\n", "not valid JSON"),
    "rank_history unknown module": ("rank_history.jsonl", "lines", lambda ev, mod: ev.append(
        {"step": 2, "module": "nowhere", "old_rank": 2, "new_rank": 1}), "nowhere"),
    "metrics rank -1": ("metrics.json", "json", lambda m: m["rank_pattern"].update(
        {next(iter(m["rank_pattern"])): -1}), "rank_pattern"),
    "metrics rank above capacity": ("metrics.json", "json", lambda m: m["rank_pattern"].update(
        {next(iter(m["rank_pattern"])): 10**6}), "capacity"),
    "metrics initial pattern string": ("metrics.json", "json", lambda m: m.update(initial_rank_pattern="x"),
                                       "initial_rank_pattern"),
    "metrics scores": ("metrics.json", "json", lambda m: m.update(importance_scores={"a": "x"}), "importance_scores"),
    "metrics not an object": ("metrics.json", "text", lambda t: "[1, 2]\n", "metrics.json"),
    "config total_steps": ("config.json", "json", lambda c: c.update(total_steps=-3), "total_steps"),
    "config seed": ("config.json", "json", lambda c: c["training"].update(seed="x"), "training.seed"),
    "config task kind": ("config.json", "json", lambda c: c["task_spec"].update(kind="dance"), "task_spec.kind"),
    "plan intrinsic dims": ("gelora_plan.json", "text", lambda t: json.dumps(
        {"intrinsic_dims": [float("nan")], "block_ranks": [1], "rank_pattern": {}}), "intrinsic_dims"),
    "plan block ranks": ("gelora_plan.json", "text", lambda t: json.dumps(
        {"intrinsic_dims": [1.0], "block_ranks": [-2], "rank_pattern": {}}), "block_ranks"),
}


def _edit_run_file(d: Path, name: str, how: str, fn) -> None:
    p = d / name
    text = p.read_text() if p.is_file() else ""
    if how == "text":
        p.write_text(fn(text))
    elif how == "json":
        obj = json.loads(text)
        fn(obj)
        p.write_text(json.dumps(obj))
    else:
        ev = [json.loads(x) for x in text.splitlines() if x.strip()]
        fn(ev, next(iter(json.loads((d / "adapter" / "adapter_config.json").read_text())["modules"])))
        p.write_text("".join(json.dumps(e) + "\n" for e in ev))


@needs_minilm
@pytest.mark.parametrize("case", sorted(RUN_FILE_EDITS))
def test_hostile_run_files_fail_every_command_that_reads_them(run_dir, fx, tmp_path, capsys, case):
    d = _copy_run(run_dir, tmp_path)
    name, how, fn, field = RUN_FILE_EDITS[case]
    _edit_run_file(d, name, how, fn)
    assert field in _one_line(capsys, _cli("plot", str(d)))
    if name == "config.json":  # eval and export take task, data and settings from it
        for cmd in ("eval", "export"):
            assert field in _one_line(capsys, _cli(*_readers(fx, d)[cmd]))
    if name == "metrics.json" and "rank_pattern" in field:  # analyze --ranks-from reads another run's metrics
        line = _one_line(capsys, _cli(*_readers(fx, run_dir)["analyze"], "--ranks-from", str(d)))
        assert field in line


@needs_minilm
@pytest.mark.parametrize("form", ["lora", "svd"])
def test_a_run_whose_finite_loss_ran_away_fails(fx, tmp_path, capsys, form):
    """`elalora train --lr 1000`, 4 steps: the LoRA form stays finite (loss in the thousands), the SVD form
    hits NaN; both end with exit 2 and one line, and write nothing."""
    rc = _train(fx, tmp_path / "out", "--form", form, "--lr", "1000")
    line = _one_line(capsys, rc)
    assert "diverged at step" in line and "learning rate" in line
    assert not (tmp_path / "out").exists()


@needs_minilm
@pytest.mark.parametrize("case,edit,field", [
    ("r -1", lambda c: c.update(r=-1), "r must be"),
    ("alpha string", lambda c: c.update(lora_alpha="x"), "lora_alpha"),
    ("rank pattern -2", lambda c: c.update(rank_pattern={"a": -2}), "rank_pattern"),
    ("target modules number", lambda c: c.update(target_modules=3), "target_modules"),
    ("not LoRA", lambda c: c.update(peft_type="IA3"), "IA3"),
])
def test_hostile_peft_configs_are_refused_by_every_reader(run_dir, fx, tmp_path, capsys, case, edit, field):
    d = _copy_run(run_dir, tmp_path)
    _edit(d / "peft", edit)
    argv = _readers(fx, d)
    for cmd in ("inspect", "eval", "export"):
        a = [x if x != str(d / "adapter") else str(d / "peft") for x in argv[cmd]]
        assert field in _one_line(capsys, _cli(*a)), cmd
