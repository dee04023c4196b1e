"""QAT under DDP: ``torchrun --nproc_per_node 2`` on CPU (gloo) writes a packed checkpoint that reloads."""

import os
import socket
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM

from optimum_pot import PoTLinear

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "qat_ddp.py")


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_qat_with_torchrun_two_cpu_processes(tmp_path):
    """~20 s on an idle 2-core machine (two processes each import torch + transformers), so it runs in CI."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(),
           SCRIPT, str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) > 0
    for name, (w, s) in ranks[0].items():  # DDP kept the replicas identical, learned scales included
        assert torch.equal(w, ranks[1][name][0]) and torch.equal(s, ranks[1][name][1]), name
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert model.config.quantization_config.quant_method == "pot"
    for name, (w, s) in ranks[0].items():
        m = model.get_submodule(name)
        assert isinstance(m, PoTLinear) and torch.equal(m.weight, w) and torch.equal(m.weight_scale, s), name
