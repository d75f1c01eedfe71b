"""Keypoints from CT volumes: Foerstner detector with non-maximum suppression
(:mod:`~cyclereg.keypoints.foerstner`), automatic lung mask
(:mod:`~cyclereg.keypoints.lungmask`) and the ``cyclereg keypoints`` entry points
(:mod:`~cyclereg.keypoints.api`)."""

from cyclereg.keypoints.api import KeypointResult, detect_keypoints, detect_keypoints_file
from cyclereg.keypoints.foerstner import FoerstnerConfig, Keypoints, PairKeypointConfig, foerstner_keypoints
from cyclereg.keypoints.lungmask import LungMaskConfig, lung_mask

__all__ = [
    "FoerstnerConfig", "KeypointResult", "Keypoints", "LungMaskConfig", "PairKeypointConfig", "detect_keypoints",
    "detect_keypoints_file", "foerstner_keypoints", "lung_mask",
]
