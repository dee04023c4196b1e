"""Every benchmark runs in its smoke mode (CI proves the scripts work; full runs are by hand, see BENCHMARKS.md)."""

import importlib.util
import os
import subprocess
import sys

import pytest

from .conftest import REPO

BENCHES = ["accuracy", "cpu_kernels", "int8_accuracy", "int8_accuracy --head", "int8_accuracy --prefill", "qat",
           "qat --skip-char --methods qp-cal", "gpu_kernels", "load_memory", "compile_cost",
           "export_decode", "synthetic_llama --no-export"]  # fmt: skip
# (synthetic_llama's exported row is export_decode's code, which its own smoke run covers)
# Peers of the `bench` extra that a benchmark compares against: `make install` (the tests' set-up) leaves them out.
PEERS = {"accuracy": ["hqq", "optimum.quanto"], "cpu_kernels": ["optimum.quanto"]}
WITHOUT_PEERS = {"accuracy": ["--methods", "int,pot,pot-cal"]}  # its own rows still run


@pytest.mark.parametrize("spec", BENCHES)
def test_bench_smoke(spec):
    name, *extra = spec.split()
    missing = [m for m in PEERS.get(name, []) if importlib.util.find_spec(m) is None]
    if missing and name not in WITHOUT_PEERS:
        pytest.skip(f"bench/{name}.py compares against {missing}: make install-bench")
    args = (WITHOUT_PEERS[name] if missing else []) + extra
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, os.path.join("bench", f"{name}.py"), "--smoke", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"bench/{name}.py --smoke failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip(), f"bench/{name}.py --smoke printed nothing"
