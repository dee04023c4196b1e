"""``torch.library`` ops: declared once, with a reference implementation and per-device kernels registered beside it."""

from .ops import available_backends, pot_linear, register_kernel  # noqa: F401
