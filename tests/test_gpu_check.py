"""benchmarks/gpu_check.py at its ``--tiny`` size on the CPU, so that the prepared GPU check cannot rot."""

from __future__ import annotations

import json

from conftest import load_benchmark


def test_gpu_check_runs_tiny_on_the_cpu(tmp_path):
    gpu_check = load_benchmark("gpu_check")
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--tiny", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["path_ok"] is True and rec["rounds"] and rec["matrices"] == 14
    assert rec["checks"]["rounds_happened"] and rec["checks"]["total_rank_kept"] and rec["checks"]["unmerge_exact"]
    assert rec["provenance"]["versions"]["torch"] and rec["step_ms_median"]["elalora"] > 0
    # an ordinary handle.step reads nothing through the transfer helpers; a round a fixed few
    assert rec["library_transfers_per_handle_step"]["plain"] == {"to_host": 0, "to_device": 0}
    assert 1 <= sum(rec["library_transfers_per_handle_step"]["round"].values()) <= 4
