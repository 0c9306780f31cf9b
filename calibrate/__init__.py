"""Calibration: observe activations on real text, fit thresholds, train predictors, save.

sparseffn's API imports this package; loading sparseffn first lets any calibrate module be
imported on its own (the import order is then always sparseffn, then calibrate).
"""
import sparseffn  # noqa: F401
