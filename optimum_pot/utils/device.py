"""What a device does fast (runtime probes only, never at import)."""

import torch

# torch's private probes of the CPU's bfloat16 matmul instructions (AMX tiles, AVX512-BF16)
CPU_BF16_PROBES = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")


def fast_bfloat16(device: torch.device | str) -> bool:
    """Whether ``device`` runs bfloat16 matmuls faster than float32: CUDA with bf16 support, or a CPU with AMX tiles
    (4.7x fp32 for a [8192, 576] x [576, 1536] matmul on a 2-core Xeon) or AVX512-BF16 instructions (5.2x on a
    2-core AMD EPYC; both through oneDNN). Other CPUs emulate bfloat16 matmuls or run them at fp32 speed, so they
    report `False`."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return any(_cpu_probe(name) for name in CPU_BF16_PROBES)


def _cpu_probe(name: str) -> bool:
    try:  # private: absent or failing means "not known fast"
        return bool(getattr(torch.cpu, name)())
    except Exception:
        return False
