"""``benchmarks/gpu.sh --smoke``: the GPU run's script end to end on the CPU with a tiny model (issue 27)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, subprocess_env


@pytest.mark.slow
def test_gpu_script_smoke_runs_every_part_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = subprocess_env(tmp_path, OUT_DIR=str(out), PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "benchmarks" / "gpu.sh"), "--smoke"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu_smoke.json").read_text())
    assert result["smoke"] is True and result["device"] == "cpu"
    parts = result["parts"]
    assert set(parts) == {"throughput", "cpu_agreement", "coco_beam5"}
    # every batch x dtype x mode row, each with a positive speed
    rows = {(r["dtype"], r["mode"], r["batch"]) for r in parts["throughput"]}
    assert rows == {(d, m, b) for d in ("fp32", "bf16", "fp16") for m in ("greedy", "beam5") for b in (2, 4)}
    assert all(r["img/s"] > 0 for r in parts["throughput"])
    # on the CPU the "device" is the CPU: the comparison machinery must find the same captions
    assert parts["cpu_agreement"]["fp32 greedy identical captions (device vs CPU)"] == 1.0
    assert [r["images"] for r in parts["coco_beam5"]] == [10, 10]
    training = result["training"]
    assert training["mixed_precision"] == "bf16" and training["steps"] == 6
    assert training["median step s"] > 0 and math.isfinite(training["final loss"])
    table = (out / "gpu_smoke.md").read_text()
    for heading in ("Captioning throughput", "Agreement", "COCO-test-size", "training (accelerate launch)"):
        assert heading in table
