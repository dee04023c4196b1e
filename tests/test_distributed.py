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
    """~30 s on an idle 2-core machine (two processes each import torch + transformers once), so it runs in CI.

    Replicas stay identical, the packed checkpoint reloads bit-exact, and 2 steps + ``resume_from_checkpoint`` to
    4 give every tensor of 4 straight steps bit for bit.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(),
           SCRIPT, str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    straight = [torch.load(tmp_path / f"straight{r}.pt") for r in (0, 1)]
    resumed = [torch.load(tmp_path / f"resumed{r}.pt") for r in (0, 1)]
    packed = [k for k in straight[0] if k.endswith("weight_scale")]
    assert len(packed) > 0
    for state in (straight[1], *resumed):  # DDP kept the replicas identical; the resumed run is the same run
        assert state.keys() == straight[0].keys()
        assert [k for k in state if not torch.equal(state[k], straight[0][k])] == []
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert model.config.quantization_config.quant_method == "pot"
    for key in packed:
        name = key.rsplit(".", 1)[0]
        m = model.get_submodule(name)
        assert isinstance(m, PoTLinear), name
        assert torch.equal(m.weight, straight[0][f"{name}.weight"]) and torch.equal(m.weight_scale, straight[0][key])
