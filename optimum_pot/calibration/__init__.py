"""Calibrated PTQ: error-feedback rounding (GPTQ) onto any level set, PoTPTQ step 2, per-layer bit allocation.

``data.py`` turns text into token samples, ``blocks.py`` finds the decoder blocks and catches their inputs,
``weights.py`` supplies the float targets, ``hessian.py`` / ``gptq.py`` round one layer with error feedback,
``sequential.py`` rounds one block stage by stage, ``refine.py`` learns the scale residuals of one block (step 2),
``allocation.py`` chooses per-layer bits under a budget and ``api.py`` runs the whole model (docs/calibration.md).
"""

from .api import calibrate
from .blocks import find_blocks
from .data import calibration_samples
from .gptq import gptq_round

__all__ = ["calibrate", "calibration_samples", "find_blocks", "gptq_round"]
