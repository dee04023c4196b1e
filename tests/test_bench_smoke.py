"""Every benchmark runs in its smoke mode (CI proves the scripts work; full runs are by hand, see BENCHMARKS.md)."""

import os
import subprocess
import sys

import pytest
from .conftest import REPO

BENCHES = ["accuracy", "cpu_kernels", "int8_accuracy", "qat", "gpu_kernels", "load_memory"]


@pytest.mark.parametrize("name", BENCHES)
def test_bench_smoke(name):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, os.path.join("bench", f"{name}.py"), "--smoke"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"bench/{name}.py --smoke failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip(), f"bench/{name}.py --smoke printed nothing"
