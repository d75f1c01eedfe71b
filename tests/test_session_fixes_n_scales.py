"""Contracts of small mends of intensity floors and the local NCC at extreme intensity scales (2026-12-07).

Mended: :func:`cyclereg.dense.data.preprocess` (``mri``) floored the percentile range at an absolute 1e-6
intensity units, so a map whose values are all below about 1e-6 (e.g. in SI units) was not mapped to [0, 1];
the floor (``MIN_INTENSITY_RANGE``) is now relative to the image's ``max |x|``, and at least the dtype's smallest
normal number, so ordinary images give the same bits as before and a constant image, in any unit and dtype,
still gives 0 (no division by 0).

:func:`cyclereg.keypoints.foerstner.distinctiveness` floored the image's robust intensity range at an absolute
1e-6 likewise: an image of range 1e-12 was not scaled to unit range and gave no keypoints. The floor is now
relative to ``max |x|`` the same way (the same keypoints and scores as before on ordinary CT).

:func:`cyclereg.dense.similarity.ncc_loss` took local variances as ``E[x^2] - E[x]^2`` in float32, so images
offset by 1000 (raw MRI values) lost them to cancellation (a loss of -7 or 43 instead of 0.08); each image's mean
(per batch item) is now taken out first, which NCC and its ``eps`` do not see, and ordinary images in [0, 1]
change only at float32 rounding (4e-7 of a loss of 0.08, nearer the float64 loss than before).

:func:`cyclereg.dense.similarity.mind_loss` floored each image's mean patch variance at :func:`mind_ssc`'s ``eps``
of 1e-6 intensity^2, an absolute unit neither docstring mentioned, and took no ``eps``: images of values about 1e-5
got a flat, near-zero loss. MIND keeps its absolute floor (the same values as before); ``mind_loss`` now takes
``eps`` (same default, checked as ``mind_ssc``'s) and passes it on, and both docstrings say to scale it by ``s^2``
for images scaled by ``s``.

The tests of the mends themselves are in ``tests/test_numeric_range_walk.py`` (its former strict xfails); these
cover what they do not.
"""

import pytest
import torch

from cyclereg.dense.config import PreprocessConfig
from cyclereg.dense.data import preprocess
from cyclereg.dense.similarity import mind_loss, ncc_loss
from cyclereg.keypoints.foerstner import distinctiveness


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value", [0.0, 1e-3, 7.0, -1e-30])
def test_mri_percentile_normalisation_of_a_constant_image_is_zero(dtype, value):
    """A constant image (all-zero, tiny, ordinary, or below float16's range, where it is 0) has an empty
    percentile range: every voxel is at the 1st percentile, so 0, never NaN (the relative floor must not
    round to 0 in float16)."""
    image = torch.full((4, 4, 4), value).to(dtype)
    got = preprocess(image, PreprocessConfig(mode="mri"))
    assert got.dtype == dtype and torch.equal(got, torch.zeros(4, 4, 4, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [0.0, 1e-40, 1e-12, -1024.0])
def test_foerstner_distinctiveness_of_a_constant_image_is_zero(dtype, value):
    """A constant image (all-zero, subnormal, tiny or CT air) has no gradient: ``D`` is 0 everywhere, never NaN
    (its range is 0 below any floor, and the floor is never 0)."""
    image = torch.full((8, 8, 8), value, dtype=dtype)
    assert torch.equal(distinctiveness(image, (1.0, 1.0, 1.0), 1.0), torch.zeros(8, 8, 8, dtype=dtype))


def test_ncc_loss_does_not_depend_on_an_offset_of_one_image_per_batch_item():
    """Offsets of one image only, different per batch item (+1000 and -3000 on ``fixed``'s two items, 0 on
    ``warped``): NCC of each window is unchanged, so the float32 loss is the float64 loss of the plain pair to
    1e-5 (float32 values near 3000 are held to 2.4e-4, against local variances of about 0.05)."""
    g = torch.Generator().manual_seed(4)
    f = torch.rand(2, 1, 10, 10, 10, generator=g)
    w = 0.7 * f + 0.3 * torch.rand(2, 1, 10, 10, 10, generator=g)
    want = float(ncc_loss(f.double(), w.double(), radius=2))
    offset = torch.tensor([1000.0, -3000.0]).view(2, 1, 1, 1, 1)
    assert float(ncc_loss(f + offset, w, radius=2)) == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("eps", [0.0, -1e-6, float("nan"), float("inf"), None])
def test_mind_loss_refuses_an_eps_that_is_not_finite_and_positive(eps):
    """``mind_loss``'s new ``eps`` is checked before any work, as ``mind_ssc``'s: one line naming ``eps``."""
    image = torch.rand(1, 1, 6, 6, 6, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match=r"^eps: expected a finite constant > 0, got "):
        mind_loss(image, image, eps=eps)
