"""What a device does fast (runtime probes only, never at import)."""

import torch


def fast_bfloat16(device: torch.device | str) -> bool:
    """Whether ``device`` runs bfloat16 matmuls faster than float32: CUDA with bf16 support, or a CPU with AMX tiles
    (4.7x fp32 for a [8192, 576] x [576, 1536] matmul on the 2-core test machine). Other CPUs emulate bfloat16
    matmuls or run them at fp32 speed, so they report `False`."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:  # a private probe of torch's CPU capabilities; absent or failing means "not known fast"
        return bool(torch.cpu._is_amx_tile_supported())
    except Exception:
        return False
