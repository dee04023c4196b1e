"""A fast output head for CPU decoding: an int8 per-row copy of a float ``nn.Linear`` (usually the tied ``lm_head``).

Why: a small model's ``lm_head`` is its largest matrix (SmolLM2-135M: 49152 × 576, tied to the input embedding, a
quarter of the parameters) and, kept in float for accuracy, it streams 113 MB per decoded token — as much as all
the packed PoT layers together. Packing it with a 4-bit level set costs a lot of perplexity (docs/cpu_kernel.md);
8 bits per row costs well under 1 %. The int8 copy is a *serving* copy: the float ``weight`` stays the module's
parameter (still tied, still what ``state_dict``/``save_pretrained`` write), so checkpoints, weight tying and
training are unchanged, and the copy is rebuilt if that weight is modified in place.

The matmul is torch's own ``aten._weight_int8pack_mm`` (int8 weights, per-row scales, bfloat16 activations), used
on CPU for decode-sized inputs; prefill, training, and other devices use the float weight (it is faster there, and
exact).
"""

import torch
import torch.nn.functional as F
from torch import nn

#: torch's int8 matmul returns garbage on CPU unless the inner dimension is a multiple of 16 (measured with torch
#: 2.13: K = 72 and 100 fail, every multiple of 16 tried passes); the copy is zero-padded to a multiple of this.
K_MULTIPLE = 32

#: Rows of input (tokens) up to which the int8 matmul is used; above it the float weight is faster on CPU
#: (bench/cpu_e2e.py measures both).
MAX_INT8_ROWS = 16


@torch.no_grad()
def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: ``weight ≈ q · scale[:, None]``, ``q`` in [-127, 127].

    Args:
        weight (`torch.Tensor` of shape `[out, in]`): finite float weight.

    Returns:
        ``(q, scale)``: int8 ``[out, in]`` and bfloat16 ``[out]`` (the dtype the int8 matmul takes); rows of zeros
        get scale 1.

    Raises:
        ValueError: the weight has NaN/Inf values.
    """
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError("int8 lm_head: the weight has NaN/Inf values; fix or reload the float checkpoint.")
    amax = w.abs().amax(dim=1)  # [out]
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)).to(torch.bfloat16)
    # Round against the bfloat16 scale actually used, so the stored codes minimise the error of what is computed.
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8HeadLinear(nn.Linear):
    """``nn.Linear`` whose CPU decode-time matmul reads an int8 per-row copy of its float weight.

    Build it with :meth:`from_linear`; the float ``weight``/``bias`` are the source module's own parameters
    (shared, not copied). ``qweight`` and ``qscale`` are non-persistent buffers: they are never saved.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8HeadLinear":
        """Wraps ``linear`` (an ``nn.Linear``, weight ``[out, in]``) sharing its parameters."""
        if type(linear) is not nn.Linear:
            raise ValueError(
                f"int8 lm_head needs a float nn.Linear output layer, got {type(linear).__name__}; keep the head in "
                "float (leave 'lm_head' in modules_to_not_convert) to use it."
            )
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        new.train(linear.training)
        new.register_buffer("qweight", torch.empty(0, dtype=torch.int8), persistent=False)
        new.register_buffer("qscale", torch.empty(0, dtype=torch.bfloat16), persistent=False)
        new._source_version = None
        new.refresh()
        return new

    def to_linear(self) -> nn.Linear:
        """The plain ``nn.Linear`` (same parameters) without the int8 copy."""
        new = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        new.weight, new.bias = self.weight, self.bias
        return new.train(self.training)

    def refresh(self) -> None:
        """Re-quantises the int8 copy from the current float weight."""
        if self.weight.device.type == "meta":  # a skeleton: built once real weights are there
            return
        q, self.qscale = quantize_rows_int8(self.weight)
        pad = -self.in_features % K_MULTIPLE
        self.qweight = F.pad(q, (0, pad)) if pad else q  # [out, in + pad]; the pad columns are zero
        self._source_version = self._stamp()

    def _stamp(self) -> tuple[int, int]:
        """Identifies the float weight's current contents: in-place edits bump ``_version``; re-tying or
        ``.to()`` swaps the storage."""
        return self.weight.data_ptr(), self.weight._version

    def _use_int8(self, x: torch.Tensor) -> bool:
        if x.device.type != "cpu" or self.weight.device.type != "cpu" or self.qweight.numel() == 0:
            return False
        if self.training or (torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad)):
            return False  # training needs the float weight's exact gradient
        return x.numel() // max(self.in_features, 1) <= MAX_INT8_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._use_int8(x):
            return F.linear(x, self.weight, self.bias)
        if not torch.compiler.is_compiling() and self._stamp() != self._source_version:
            self.refresh()  # the float weight was edited in place, re-tied or cast since the copy was made
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # [tokens, in]
        if self.qweight.shape[1] != self.in_features:
            x2 = F.pad(x2, (0, self.qweight.shape[1] - self.in_features))  # [tokens, in + pad]
        scale = self.qscale.to(torch.bfloat16)  # a model.half() cast reaches float buffers too
        out = torch._weight_int8pack_mm(x2, self.qweight, scale).to(x.dtype)  # [tokens, out]
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", int8 rows for ≤ {MAX_INT8_ROWS} tokens on CPU"


def use_int8_head(model: nn.Module, name: str) -> Int8HeadLinear:
    """Replaces the float ``nn.Linear`` submodule ``name`` of ``model`` by an :class:`Int8HeadLinear` (idempotent)."""
    module = model.get_submodule(name)
    if isinstance(module, Int8HeadLinear):
        return module
    new = Int8HeadLinear.from_linear(module)
    model.set_submodule(name, new)
    return new
