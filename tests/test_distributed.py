"""DDP on CPU (gloo): replicas stay bitwise identical and match one process with the same global batch."""

import os
import shutil
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
def test_torchrun_plain_loop_matches_single_process(tmp_path):
    torchrun = shutil.which("torchrun") or None
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    r = subprocess.run(cmd + ["--nproc_per_node", "2", "--master_port", "29531", str(HERE / "ddp_worker.py"),
                              str(tmp_path / "ddp.pt")], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, str(HERE / "ddp_worker.py"), str(tmp_path / "one.pt")],
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ddp, one = torch.load(tmp_path / "ddp.pt"), torch.load(tmp_path / "one.pt")
    assert ddp["world"] == 2 and one["world"] == 1
    assert ddp["events"], "the run must contain rank changes"
    assert ddp["pattern"] == one["pattern"]
    strip = lambda evs: [{k: v for k, v in e.items() if k != "scores"} for e in evs]  # noqa: E731
    assert strip(ddp["events"]) == strip(one["events"])
    for e_ddp, e_one in zip(ddp["events"], one["events"]):
        torch.testing.assert_close(torch.tensor(e_ddp["scores"]), torch.tensor(e_one["scores"]), rtol=1e-3, atol=1e-9)
    assert all(torch.equal(a, b) for a, b in zip(ddp["masks"], one["masks"]))
    # The all-reduce sums in another order than one process does; over 24 Adam steps those ~1e-7
    # differences grow on near-zero gradients (Adam divides by sqrt(v)), so weights agree to ~1e-3.
    for n in one["params"]:
        torch.testing.assert_close(ddp["params"][n], one["params"][n], rtol=0, atol=2e-3, msg=n)


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
    accel = shutil.which("accelerate")
    cmd = [accel] if accel else [sys.executable, "-m", "accelerate.commands.launch"]
    # accelerate 1.x: `--cpu --num_processes 2` runs ONE process unless an mpirun hostfile is given;
    # `--multi_gpu` starts torch.distributed.run, which on a machine without CUDA uses gloo on the CPU.
    r = subprocess.run(cmd + ["launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
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
    for n in one["params"]:
        torch.testing.assert_close(ddp["params"][n], one["params"][n], rtol=0, atol=2e-3, msg=n)
