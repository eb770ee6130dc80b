"""benchmarks/distributed_calib.py: prompts, the scaling table, the launcher's torchrun commands, and a
real one-process run of the worker (gloo, tiny-sd3) so the script is known to work end to end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from unittest import mock

import torch
from _utils.bench import load_benchmark

bench = load_benchmark("distributed_calib")


def _result(n: int, generate: float, quantize: float, digest: str = "a") -> dict:
    return {
        "world_size": n,
        "times_s": {"build": 1.0, "generate": generate, "quantize": quantize},
        "quantize_phases_s": {"calibrate": quantize / 2},
        "items_per_process": [4 // n] * n,
        "set_sha256": digest,
        "model_sha256": digest,
    }


def test_prompts_are_distinct_and_deterministic():
    p = bench.prompts(100)
    assert len(set(p)) == 100 and p == bench.prompts(100)


def test_report_efficiency_and_identity():
    table = bench.report([_result(2, 5.0, 2.0), _result(1, 10.0, 4.0), _result(4, 2.5, 1.25, digest="b")])
    rows = table.splitlines()[2:]
    assert rows[0].startswith("| 1 |") and rows[1].startswith("| 2 |")
    cells = rows[1].split("|")
    assert [c.strip() for c in cells[6:9]] == ["1.00", "1.00", "1.00"]  # perfect scaling at N=2
    cells = rows[2].split("|")
    # quantize 4 / (4 * 1.25) = 0.8; total 14 / (4 * 3.75) = 0.93
    assert [c.strip() for c in cells[6:9]] == ["1.00", "0.80", "0.93"]
    assert cells[9].strip() == "NO" and cells[10].strip() == "NO"


def test_launcher_runs_torchrun_once_per_process_count(tmp_path):
    seen = []

    def fake_run(cmd, env, timeout):
        n = int(next(a for a in cmd if a.startswith("--nproc-per-node=")).split("=")[1])
        seen.append(cmd)
        (tmp_path / f"results_{n}.json").write_text(json.dumps(_result(n, 8.0 / n, 4.0 / n)))
        return subprocess.CompletedProcess(cmd, 0)

    argv = ["--model", "tiny-sd3", "--nprocs", "1,2", "--out", str(tmp_path)]
    with mock.patch.object(bench.subprocess, "run", fake_run):
        assert bench.main(argv) == 0
    assert len(seen) == 2
    for cmd in seen:
        assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--worker" in cmd
        assert "--nprocs" not in cmd and "--threads" in cmd  # CPU: the same threads per process for every N
    assert len(json.loads((tmp_path / "results.json").read_text())) == 2


def test_worker_runs_on_one_gloo_process(tmp_path, monkeypatch):
    """What torchrun starts, with a world of one: a calibration set and a quantized model."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    threads = torch.get_num_threads()
    try:
        args = bench._args(["--worker", "--prompts", "2", "--threads", "1", "--out", str(tmp_path)])
        bench.worker(args)
    finally:
        torch.set_num_threads(threads)
    assert not torch.distributed.is_initialized()
    result = json.loads((tmp_path / "results_1.json").read_text())
    assert result["world_size"] == 1 and result["items"] == 4 and result["items_per_process"] == [4]
    assert set(result["times_s"]) == {"build", "generate", "quantize"} and len(result["model_sha256"]) == 64
    assert (tmp_path / "calib-1" / "manifest.json").is_file() and os.listdir(tmp_path / "calib-1")
