"""The one validator (issue 38, src/elalora/validation.py): configs, adapter directories, checkpoint states
and resumes, and the divergence of a finite loss. Both forms and both budgets where they apply; tiny
models only. The CLI side (exit 2, one line) is in tests/test_hostile.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import elalora
from elalora import ConfigError
from elalora.errors import AdapterLoadError, TrainingDivergedError
from elalora.integrations.trainer import LossDivergence
from elalora.layers import ElasticAdapter

from conftest import tiny_bert

FORMS = ("svd", "lora")
BUDGETS = ("rank", "params")
METHODS = ("elalora", "adalora")


def _config(method="elalora", form="lora", budget="rank", **kw):
    base = dict(r=2, form=form, budget=budget, modules_to_save=["classifier"], total_steps=30, tinit=2, tfinal=2,
                delta_t=2)
    base.update(kw)
    if method == "elalora":
        return elalora.ElaLoRAConfig(b=1, **base)
    return elalora.AdaLoRAConfig(init_r=3, **base)


def _structure(model) -> tuple:
    """What a failed load must leave as it was: module types, every tensor, requires_grad, training mode."""
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()}, model.training)


def _same(a, b) -> bool:
    return (a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
            and a[2] == b[2] and a[3] == b[3])


def _train(h, steps=8):
    params = [p for p in h.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    h.model.train()
    g = torch.Generator().manual_seed(0)
    for t in range(steps):
        ids = torch.randint(0, 100, (4, 8), generator=g)
        h.model(input_ids=ids, labels=torch.randint(0, 2, (4,), generator=g)).loss.backward()
        opt.step()
        h.step(opt)
        opt.zero_grad()
    return opt


# ============================================================================================ configs
@pytest.mark.parametrize("field,value", [("form", ["svd"]), ("form", "foo"), ("budget", ["rank"]), ("budget", "foo"),
                                         ("budget", None), ("grace_rounds", -1), ("grace_rounds", 1.5)])
def test_config_fields_of_the_wrong_type_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        elalora.ElaLoRAConfig(r=2, **{field: value})


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("field,value", [("budget", "foo"), ("form", "foo"), ("form", ["svd"]), ("r", 0),
                                         ("tinit", "x"), ("beta1", 2.0)])
def test_get_model_rechecks_fields_changed_after_construction(method, field, value):
    cfg = _config(method)
    setattr(cfg, field, value)
    model = tiny_bert()
    before = _structure(model)
    with pytest.raises(ConfigError, match=field):
        elalora.get_model(model, cfg)
    assert _same(before, _structure(model))


def test_forms_and_budgets_constants_drive_the_cli_choices():
    from elalora.cli.main import build_parser
    from elalora.config import BUDGETS as B, FORMS as F
    from elalora.layers import ADAPTER_FORMS

    assert F == tuple(ADAPTER_FORMS) and B == BUDGETS
    train = next(a for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions
                 if "--form" in a.option_strings)
    assert tuple(train.choices) == F


# ================================================================================ adapter directories
def _saved(tmp_path, form, budget="rank", method="elalora") -> tuple[Path, torch.Tensor]:
    h = elalora.get_model(tiny_bert(), _config(method, form, budget))
    _train(h, 6)
    h.save_pretrained(tmp_path / "ad")
    h.model.eval()
    with torch.no_grad():
        out = h.model(input_ids=torch.arange(16).reshape(2, 8)).logits
    return tmp_path / "ad", out


def _edit(adir: Path, fn) -> None:
    p = adir / "adapter_config.json"
    cfg = json.loads(p.read_text())
    fn(cfg)
    p.write_text(json.dumps(cfg))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("budget", BUDGETS)
def test_adapter_saved_without_its_form_key_loads_in_its_form(tmp_path, form, budget):
    adir, want = _saved(tmp_path, form, budget)
    _edit(adir, lambda c: c["config"].pop("form"))
    h = elalora.load_adapter(tiny_bert(), adir)
    assert h.config.form == form and {a.kind for a in h.adapters} == {form}
    with torch.no_grad():
        assert torch.allclose(h.model(input_ids=torch.arange(16).reshape(2, 8)).logits, want, atol=1e-6)


@pytest.mark.parametrize("form", FORMS)
def test_module_entries_saved_under_the_old_name_kind_load(tmp_path, form):
    adir, want = _saved(tmp_path, form)
    saved = json.loads((adir / "adapter_config.json").read_text())
    assert all("form" in i and "kind" not in i for i in saved["modules"].values())  # one name on disk

    def rename(c):
        for i in c["modules"].values():
            i["kind"] = i.pop("form")

    _edit(adir, rename)
    h = elalora.load_adapter(tiny_bert(), adir)
    with torch.no_grad():
        assert torch.allclose(h.model(input_ids=torch.arange(16).reshape(2, 8)).logits, want, atol=1e-6)


def _first(c):
    return next(iter(c["modules"].values()))


ADAPTER_EDITS = {
    "rank -1": (lambda c: _first(c).update(rank=-1), "rank"),
    "rank above capacity": (lambda c: _first(c).update(rank=_first(c)["capacity"] + 1), "rank"),
    "capacity below rank": (lambda c: _first(c).update(capacity=max(_first(c)["rank"] - 1, 1), rank=3), "rank"),
    "capacity 10^6": (lambda c: _first(c).update(capacity=10**6), "capacity"),
    "form foo": (lambda c: _first(c).update(form="foo"), "form"),
    "config form foo": (lambda c: c["config"].update(form="foo"), "form"),
    "form disagrees": (lambda c: c["config"].update(form="svd" if c["config"]["form"] == "lora" else "lora"), "form"),
    "module form disagrees": (lambda c: _first(c).update(form="svd" if _first(c)["form"] == "lora" else "lora"),
                              "form"),
    "missing module": (lambda c: c["modules"].pop(next(iter(c["modules"]))), "does not list"),
    "budget foo": (lambda c: c["config"].update(budget="foo"), "budget"),
    "budget list": (lambda c: c["config"].update(budget=["rank"]), "budget"),
    "grace -3": (lambda c: c["config"].update(grace_rounds=-3), "grace_rounds"),
    "event rank -7": (lambda c: c.update(events=[{"step": 1, "module": next(iter(c["modules"])), "old_rank": 2,
                                                  "new_rank": -7}]), "new_rank"),
    "initial pattern": (lambda c: c.update(initial_rank_pattern={next(iter(c["modules"])): 10**6}),
                        "initial_rank_pattern"),
    "step_count": (lambda c: c.update(step_count=-1), "step_count"),
    "version string": (lambda c: c.update(elalora_format_version="1"), "elalora_format_version"),
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", sorted(ADAPTER_EDITS))
def test_hostile_adapter_configs_fail_and_leave_the_model_as_it_was(tmp_path, form, case):
    edit, field = ADAPTER_EDITS[case]
    adir, _ = _saved(tmp_path, form)
    _edit(adir, edit)
    model = tiny_bert()
    before = _structure(model)
    with pytest.raises(AdapterLoadError, match=field):
        elalora.load_adapter(model, adir)
    assert _same(before, _structure(model))
    with pytest.raises(AdapterLoadError, match=field):  # inspect's reader is as strict
        elalora.persistence.adapter_summary(adir)


@pytest.mark.parametrize("form", FORMS)
def test_a_load_failing_after_wrapping_puts_the_model_back(tmp_path, form, monkeypatch):
    adir, _ = _saved(tmp_path, form)
    model = tiny_bert()
    model.classifier.weight.requires_grad_(False)  # the user's own flags, not the defaults
    before = _structure(model)

    def fail(*a, **k):
        raise AdapterLoadError("injected failure after the model was wrapped")

    monkeypatch.setattr(elalora.persistence, "restore_adapter", fail)
    with pytest.raises(AdapterLoadError, match="injected"):
        elalora.load_adapter(model, adir)
    assert not any(isinstance(m, ElasticAdapter) for m in model.modules())
    assert _same(before, _structure(model))
    monkeypatch.undo()
    elalora.load_adapter(model, adir)  # and the model still takes the adapter


# ================================================================================ checkpoint states
def _ckpt(tmp_path, method, form, budget) -> Path:
    h = elalora.get_model(tiny_bert(), _config(method, form, budget))
    opt = _train(h, 8)
    elalora.save_checkpoint(tmp_path / "ck.pt", h, opt)
    return tmp_path / "ck.pt"


def _resume_target(method, form, budget):
    h = elalora.get_model(tiny_bert(), _config(method, form, budget))
    opt = torch.optim.AdamW([p for p in h.model.parameters() if p.requires_grad], lr=1e-2)
    return h, opt


def _handle_snapshot(h):
    return (h.step_count, len(h.events), [a.active.clone() for a in h.adapters], h.allocator.state_dict(),
            {k: v.clone() for k, v in h.model.state_dict().items()})


def _unchanged(h, snap) -> bool:
    now = _handle_snapshot(h)
    return (now[0] == snap[0] and now[1] == snap[1] and all(torch.equal(a, b) for a, b in zip(now[2], snap[2]))
            and now[3] == snap[3] and all(torch.equal(now[4][k], snap[4][k]) for k in snap[4]))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("budget", BUDGETS)
def test_checkpoint_records_what_it_is(tmp_path, method, form, budget):
    blob = torch.load(_ckpt(tmp_path, method, form, budget), weights_only=False)
    st = blob["elalora"]
    assert (st["method"], st["form"], st["budget"]) == (method, form, budget)
    assert st["schedule"] == {"tinit": 2, "tfinal": 2, "delta_t": 2}
    assert set(st["capacities"].values()) == {4 if method == "elalora" else 3}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("change", ["budget", "form", "method", "schedule"])
def test_resume_into_another_run_is_refused_before_anything_changes(tmp_path, method, form, budget, change):
    path = _ckpt(tmp_path, method, form, budget)
    other = {"budget": ("rank" if budget == "params" else "params"),
             "form": ("svd" if form == "lora" else "lora")}
    if change == "method":
        h, opt = _resume_target("adalora" if method == "elalora" else "elalora", form, budget)
        sides = (repr(method), repr(h.config.method))
    elif change == "schedule":
        h = elalora.get_model(tiny_bert(), _config(method, form, budget, delta_t=3))
        opt = torch.optim.AdamW([p for p in h.model.parameters() if p.requires_grad], lr=1e-2)
        sides = ("'delta_t': 2", "'delta_t': 3")
    else:
        kw = {"form": form, "budget": budget, change: other[change]}
        h, opt = _resume_target(method, kw["form"], kw["budget"])
        sides = (repr({"form": form, "budget": budget}[change]), repr(other[change]))
    snap = _handle_snapshot(h)
    with pytest.raises(AdapterLoadError) as e:
        elalora.load_checkpoint(path, h, opt)
    msg = str(e.value)
    assert all(s in msg for s in sides), msg
    assert "\n" not in msg and _unchanged(h, snap)


def _strip_identity(path: Path) -> None:
    blob = torch.load(path, weights_only=False)
    for k in ("form", "budget", "schedule", "capacities"):
        blob["elalora"].pop(k)
    torch.save(blob, path)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("budget", BUDGETS)
def test_older_checkpoints_load_when_consistent_and_are_refused_across_budgets(tmp_path, method, form, budget):
    path = _ckpt(tmp_path, method, form, budget)
    _strip_identity(path)  # what a checkpoint written before issue 38 holds
    h, opt = _resume_target(method, form, budget)
    elalora.load_checkpoint(path, h, opt)
    assert h.step_count == 8
    h.step(opt)  # and the next step runs
    other = "rank" if budget == "params" else "params"
    h2, opt2 = _resume_target(method, form, other)
    snap = _handle_snapshot(h2)
    with pytest.raises(AdapterLoadError, match="budget"):
        elalora.load_checkpoint(path, h2, opt2)
    assert _unchanged(h2, snap)


def _tamper(path: Path, fn) -> Path:
    blob = torch.load(path, weights_only=False)
    fn(blob)
    torch.save(blob, path)
    return path


def _first_name(b):
    return next(iter(b["elalora"]["masks"]))


STATE_EDITS = {
    "param_budget -5": (lambda b: b["elalora"]["allocator"].update(param_budget=-5), "param_budget", "params"),
    "float mask": (lambda b: b["elalora"]["masks"].update(
        {_first_name(b): b["elalora"]["masks"][_first_name(b)].float()}), "boolean", "rank"),
    "rounds -1": (lambda b: b["elalora"]["allocator"].update(rounds=-1), "rounds", "rank"),
    "rounds str": (lambda b: b["elalora"]["allocator"].update(rounds="3"), "rounds", "rank"),
    "total_steps 0": (lambda b: b["elalora"]["allocator"].update(total_steps=0), "total_steps", "rank"),
    "unknown key": (lambda b: b["elalora"]["allocator"].update(b0=5), "b0", "rank"),
    "born shape": (lambda b: b["elalora"]["allocator"].update(born=[[0]]), "born", "rank"),
    "step_count -1": (lambda b: b["elalora"].update(step_count=-1), "step_count", "rank"),
    "event rank -7": (lambda b: b["elalora"].update(events=[{"step": 1, "module": _first_name(b), "old_rank": 2,
                                                              "new_rank": -7}]), "new_rank", "rank"),
    "initial pattern": (lambda b: b["elalora"].update(initial_rank_pattern={_first_name(b): 99}),
                        "initial_rank_pattern", "rank"),
    "capacities": (lambda b: b["elalora"]["capacities"].update({_first_name(b): 99}), "capacity", "rank"),
    "nan scores": (lambda b: b["elalora"]["importance"]["sens"][0].fill_(float("nan")), "importance", "rank"),
    "nan weight": (lambda b: next(v for k, v in b["model"].items() if v.is_floating_point()).fill_(float("nan")),
                   "NaN", "rank"),
    "model mask float": (lambda b: b["model"].update({f"{_first_name(b)}.active":
                                                     b["model"][f"{_first_name(b)}.active"].float()}),
                         "active", "rank"),
    "version str": (lambda b: b.update(elalora_checkpoint_version="1"), "elalora_checkpoint_version", "rank"),
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", sorted(STATE_EDITS))
def test_hostile_checkpoint_values_are_refused(tmp_path, form, case):
    edit, field, budget = STATE_EDITS[case]
    path = _tamper(_ckpt(tmp_path, "elalora", form, budget), edit)
    h, opt = _resume_target("elalora", form, budget)
    snap = _handle_snapshot(h)
    with pytest.raises(AdapterLoadError, match=field):
        elalora.load_checkpoint(path, h, opt)
    assert _unchanged(h, snap)


@pytest.mark.parametrize("budget", BUDGETS)
def test_adalora_budget_values_are_checked(tmp_path, budget):
    path = _tamper(_ckpt(tmp_path, "adalora", "svd", budget), lambda b: b["elalora"]["allocator"].update(bT=-5))
    h, opt = _resume_target("adalora", "svd", budget)
    with pytest.raises(AdapterLoadError, match="bT"):
        elalora.load_checkpoint(path, h, opt)


# =============================================================================== Trainer resumes
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("change", ["form", "budget"])
def test_trainer_resume_into_another_form_or_budget_names_both(tmp_path, form, change):
    from test_trainer import Toy, _args
    from transformers import Trainer

    other = {"form": "svd" if form == "lora" else "lora", "budget": "params"}

    def run(resume=None, **kw):
        model = tiny_bert()
        cfg = dict(form=form, budget="rank")
        cfg.update(kw)
        h = elalora.get_model(model, elalora.ElaLoRAConfig(r=3, b=2, k=2, tinit=2, tfinal=2, delta_t=2,
                                                             modules_to_save=["classifier"], **cfg))
        args = _args(tmp_path, num_train_epochs=1, save_strategy="steps", save_steps=4, logging_steps=100)
        trainer = Trainer(model=model, args=args, train_dataset=Toy())
        h.callback().attach(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return h

    run()
    for resume in (str(tmp_path / "out" / "checkpoint-4"), True):
        with pytest.raises(AdapterLoadError) as e:
            run(resume=resume, **{change: other[change]})
        msg = str(e.value)
        assert change in msg and repr(other[change]) in msg, msg


# ===================================================================================== divergence
def test_loss_divergence_condition():
    w = LossDivergence()
    w.update({"loss": 0.69}, 1)
    for step, loss in enumerate([0.8, 7.5, 8.0], start=2):  # two high logs: forgiven so far
        w.update({"loss": loss}, step)
    w.update({"loss": 0.7}, 5)  # recovered: the count starts again
    w.update({"loss": 9.0}, 6)
    w.update({"loss": 9.0}, 7)
    with pytest.raises(TrainingDivergedError, match="step 8.*0.69.*2381.*10x"):
        w.update({"loss": 2381.0}, 8)
    # a short run that ends diverged: caught at the final log by the run's mean loss
    w = LossDivergence()
    for step, loss in enumerate([0.69, 500.0, 900.0], start=1):
        w.update({"loss": loss}, step)
    with pytest.raises(TrainingDivergedError, match="end of training"):
        w.update({"train_loss": 466.9}, 3)
    # ... but not one last spike of an otherwise healthy run
    w = LossDivergence()
    for step, loss in enumerate([0.69, 0.5, 0.4, 8.0], start=1):
        w.update({"loss": loss}, step)
    w.update({"train_loss": 2.4}, 4)
    # a start near zero loss is floored: noise around 0.01 is not a 10x rise
    w = LossDivergence()
    for step, loss in enumerate([0.01, 0.2, 0.3, 0.25, 0.5], start=1):
        w.update({"loss": loss}, step)


def test_a_healthy_high_learning_rate_run_is_not_stopped(tmp_path):
    """A noisy but healthy run (lr 3e-2 on the LoRA form, a hundred logged steps of one small batch each): the
    watch sees every log and does not fire, while the loss does come down."""
    from test_trainer import Toy, _args
    from transformers import Trainer

    model = tiny_bert()
    h = elalora.get_model(model, elalora.ElaLoRAConfig(r=2, b=1, modules_to_save=["classifier"]))
    args = _args(tmp_path, num_train_epochs=1, logging_steps=1, learning_rate=3e-2, per_device_train_batch_size=2,
                 max_steps=100, logging_nan_inf_filter=False)
    trainer = Trainer(model=model, args=args, train_dataset=Toy())
    cb = h.callback().attach(trainer)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) >= 100 and max(losses) > 1.5 * losses[0]  # noisy: spikes well above the start
    assert cb.loss_watch.reference is not None and cb.loss_watch.high < cb.loss_watch.patience
