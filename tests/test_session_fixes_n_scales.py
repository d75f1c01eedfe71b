"""Contracts of small mends of intensity floors and the local NCC at extreme intensity scales (2026-12-07).

Mended: :func:`cyclereg.dense.data.preprocess` (``mri``) floored the percentile range at an absolute 1e-6
intensity units, so a map whose values are all below about 1e-6 (e.g. in SI units) was not mapped to [0, 1];
the floor (``MIN_INTENSITY_RANGE``) is now relative to the image's ``max |x|``, and at least the dtype's smallest
normal number, so ordinary images give the same bits as before and a constant image, in any unit and dtype,
still gives 0 (no division by 0).

The tests of the mends themselves are in ``tests/test_numeric_range_walk.py`` (its former strict xfails); these
cover what they do not.
"""

import pytest
import torch

from cyclereg.dense.config import PreprocessConfig
from cyclereg.dense.data import preprocess


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value", [0.0, 1e-3, 7.0, -1e-30])
def test_mri_percentile_normalisation_of_a_constant_image_is_zero(dtype, value):
    """A constant image (all-zero, tiny, ordinary, or below float16's range, where it is 0) has an empty
    percentile range: every voxel is at the 1st percentile, so 0, never NaN (the relative floor must not
    round to 0 in float16)."""
    image = torch.full((4, 4, 4), value).to(dtype)
    got = preprocess(image, PreprocessConfig(mode="mri"))
    assert got.dtype == dtype and torch.equal(got, torch.zeros(4, 4, 4, dtype=dtype))
