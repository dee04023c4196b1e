"""The Hessian of a linear layer's output error over its inputs, and its damped inverse (GPTQ's ``H⁻¹``).

For a layer ``y = W x`` the squared output error of a perturbed weight ``W + Δ`` over calibration inputs ``X`` is
``tr(Δ H Δᵀ)`` with ``H = Σ x xᵀ`` (``[K, K]``): every quantity error-feedback rounding needs comes from it.
"""

import warnings

import torch

from .options import finite_number

# Damping tried in turn (× the configured one) when H + damp·mean(diag H)·I is still not positive definite.
DAMP_RETRIES = (1, 10, 100, 1000)


class Hessian:
    """Accumulates ``H = Σ x xᵀ / T`` over batches of inputs ``[..., K]`` (float32, on the inputs' device).

    Args:
        in_features (`int`): ``K``.
        device: where ``H`` lives.
    """

    def __init__(self, in_features: int, device=None):
        self.h = torch.zeros(in_features, in_features, device=device)
        self.rows = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).to(self.h.device, torch.float32)  # [T, K]
        # Running mean keeps H's magnitude independent of the number of tokens (damping is relative anyway).
        total = self.rows + flat.shape[0]
        self.h.mul_(self.rows / total).addmm_(flat.t(), flat, alpha=1.0 / total)
        self.rows = total

    def importance(self) -> torch.Tensor:
        """Mean squared input of each column ``[K]`` (``diag H``): the weight of each column's error."""
        return self.h.diagonal().clone()


def check_damping(damp_percent) -> None:
    """Raises a `ValueError` naming the fix when the damping is not a positive number."""
    if not (finite_number(damp_percent) and damp_percent > 0):
        raise ValueError(
            f"damp_percent must be a finite number > 0 (the fraction of mean(diag H) added to H's diagonal; 0.01 is "
            f"the usual value), got {damp_percent!r}. Pass PoTConfig(damp_percent=0.01)."
        )


@torch.no_grad()
def inverse_cholesky(h: torch.Tensor, damp_percent: float, name: str = "") -> torch.Tensor | None:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``Uᵀ U = (H + λI)⁻¹``), ``λ = damp_percent · mean(diag H)``.

    Inputs that never fire (``H_ii = 0``) get ``H_ii = 1``: their weights do not change the output, so their
    rounding errors are not pushed anywhere. When the damped ``H`` is not positive definite (rank-deficient inputs,
    float32 round-off), the damping is raised ×10 and tried again, with a warning saying so.

    Returns:
        ``U`` ``[K, K]`` float32, or `None` when ``H`` is not finite or no damping helped (the caller then rounds to
        nearest, so no NaN ever reaches a scale).
    """
    check_damping(damp_percent)
    h = h.float().clone()
    if not torch.isfinite(h).all():
        warnings.warn(f"{name or 'layer'}: its input Hessian is not finite (NaN/Inf activations); rounding it to "
                      "nearest instead of error feedback.", RuntimeWarning, stacklevel=2)  # fmt: skip
        return None
    diag = h.diagonal()
    diag[diag <= 0] = 1.0
    mean = diag.mean().item()
    eye = torch.eye(h.shape[0], device=h.device)
    for factor in DAMP_RETRIES:
        damp = damp_percent * factor
        chol, info = torch.linalg.cholesky_ex(h + damp * mean * eye)
        if info.item() == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if info.item() == 0 and torch.isfinite(upper).all():
                if factor > 1:
                    warnings.warn(
                        f"{name or 'layer'}: the input Hessian was not positive definite with damp_percent="
                        f"{damp_percent:g}; used {damp:g} instead (raise PoTConfig(damp_percent=...) to silence).",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                return upper
    warnings.warn(f"{name or 'layer'}: the input Hessian stayed singular up to damp_percent={damp:g}; rounding it "
                  "to nearest instead of error feedback.", RuntimeWarning, stacklevel=2)  # fmt: skip
    return None
