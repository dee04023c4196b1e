"""PoTPTQ step 2: block-wise scale refinement on calibration data."""


def calibrate(model, config, dataset):
    """Refines the scales of a quantised model on ``dataset`` (see PoTConfig's calibration fields)."""
    raise NotImplementedError("Calibrated PTQ (PoTPTQ step 2) is not implemented yet.")
