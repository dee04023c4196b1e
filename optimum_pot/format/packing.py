"""Dense bit packing of PoT codes (the canonical on-disk layout, see docs/format.md).

Each row is a little-endian bit stream: code ``k`` occupies bits ``[k·b, (k+1)·b)`` of the row, byte ``j`` holding
stream bits ``[8j, 8j+8)`` with the lowest bit first. Rows are padded with zero codes to a multiple of 8 codes, so a
row takes ``ceil(K/8)·b`` bytes: 4-bit is two codes a byte (low nibble first), 2-bit four, and 3-bit packs 8 codes
in 3 bytes (no wasted bits).
"""

import torch


def packed_row_bytes(in_features: int, bits: int) -> int:
    """Bytes per packed row: ``ceil(K / 8) · bits``."""
    return -(-in_features // 8) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs ``[N, K]`` codes (values ``< 2^bits``) into ``[N, ceil(K/8)·bits]`` ``uint8``."""
    n, k = codes.shape
    pad = -k % 8
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, pad)).reshape(n, (k + pad) // 8, 8)  # [N, K/8, 8]
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    word = (c << shifts).sum(dim=-1, keepdim=True)  # [N, K/8, 1]: 8 codes in one 8·bits-bit word
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    return ((word >> byte_shifts) & 0xFF).to(torch.uint8).reshape(n, (k + pad) // 8 * bits)  # [N, K/8 · bits]


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[N, ceil(K/8)·bits]`` ``uint8`` → ``[N, K]`` ``uint8`` codes."""
    n = packed.shape[0]
    b = packed.to(torch.int64).reshape(n, packed.shape[1] // bits, bits)  # [N, K/8, bits] (N may be 0)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (b << byte_shifts).sum(dim=-1, keepdim=True)  # [N, K/8, 1]
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = (word >> shifts) & ((1 << bits) - 1)  # [N, K/8, 8]
    return codes.reshape(n, codes.shape[1] * 8)[:, :in_features].to(torch.uint8)
