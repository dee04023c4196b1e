"""PoTPTQ step 2: block-wise scale refinement on calibration data.

``data.py`` turns text into token samples, ``blocks.py`` finds the decoder blocks and catches their inputs,
``weights.py`` supplies the float targets, ``refine.py`` learns the scale residuals of one block and ``api.py``
runs the whole model (see docs/calibration.md).
"""

from .api import calibrate
from .blocks import find_blocks
from .data import calibration_samples

__all__ = ["calibrate", "calibration_samples", "find_blocks"]
