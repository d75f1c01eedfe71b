"""Precision-accuracy walk over the public tensor functions (audited 2026-12-07).

What was audited: the functions that take float16 / bfloat16 / float64 tensors (``cyclereg.warp``,
``cyclereg.frames``, ``cyclereg.metrics``; the cloud path's ``knn``, ``tps``, ``augment``, ``pipeline``; the
dense path's ``similarity``, ``convex``, ``instance``; ``keypoints.foerstner``; ``volumeio``). Each answer was
compared with a float64 reference computed on the same (already rounded) input values. The package's rule
(:data:`cyclereg.frames.LOW_PRECISION`): half-precision inputs are computed in float32 and answered in their
dtype, so the error is about one unit in the last place of the answer's dtype at the answer's magnitude; float64
inputs are computed in float64 (an error of float32 size there means a hidden ``.float()``).

Inputs are 128 voxels along an axis where positions matter: bfloat16 holds the integers up to 256 exactly,
but a grid coordinate ``2 i / 127 - 1`` rounded to bfloat16 is off by up to a quarter voxel, so a position
computed in the input's half precision shows as an error far above one ulp of a small answer.

The handled cases are pinned first; the cases the code computed at the wrong precision were pinned as strict
xfails and are mended (the tests pass now: half-precision inputs computed in float32 through
``frames.working_dtype`` or a ``LOW_PRECISION`` branch; float32 and float64 take the same arithmetic as before):
positions built in a half-precision field's own dtype (``warp``, ``compose``,
``warp_labels``, ``warp_between_grids``, ``sample_at_points``, ``dense.convex.resample_disp``; a float64 image with
a float32 field likewise at float32 positions), the ``frames`` conversions and ``inside_grid`` computed in half
precision, ``CloudRegistration.dense`` evaluated at points rounded to the cloud's dtype, ``lbp.min_convolution``'s
arg-min, ``soft_argmin``'s softmax, ``dense.convex.coupled_convex``, ``standardize`` and the cloud network's
``CloudNorm`` computed in half precision, ``augment.apply_affine`` multiplied in half precision, and
``knn_indices`` ranking float32 ``cdist`` distances whose expansion cancels far from an origin inside the cloud.

Inherent or small, not pinned: a half-precision answer has 8 (bfloat16) or 11 (float16) bits;
``dense.data.preprocess`` rounds its percentiles to the image's dtype before subtracting them (1.4 / 2.1 ulps);
torch casts float64 to float16 through float32 (a double rounding of 2^-14 ulp).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cyclereg import frames
from cyclereg.clouds.knn import knn_indices
from cyclereg.warp import compose, sample_at_points, warp, warp_between_grids

HALF = [torch.bfloat16, torch.float16]
N = 128  # voxels along the first axis: enough for bfloat16 grid coordinates to round


def _ramp(dtype, offset: float = 0.0, n: int = N) -> torch.Tensor:
    """``(1, 1, n, 3, 3)`` image whose value is ``i - offset`` along the first axis (whole numbers: exact in
    bfloat16 and float16 for |value| <= 256)."""
    values = torch.arange(n, dtype=torch.float64) - offset
    return values.view(1, 1, n, 1, 1).expand(1, 1, n, 3, 3).to(dtype).contiguous()


def _field(dtype, value: float = 0.0, n: int = N) -> torch.Tensor:
    """``(1, 3, n, 3, 3)`` constant displacement ``value`` along the first axis."""
    d = torch.zeros(1, 3, n, 3, 3, dtype=torch.float64)
    d[:, 0] = value
    return d.to(dtype)


def _ulp(reference: torch.Tensor, dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at each value of ``reference`` (float64), at least at 1/64."""
    mag = reference.abs().clamp_min(1 / 64)
    return torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(mag)))


# ----------------------------------------------------------------------------- handled: float64 stays float64
def test_warp_float64_fractional_shift_is_float64_accurate():
    """A float64 ramp warped by 0.3 voxel: exactly ``i + 0.3`` to float64 rounding (1e-12), not float32's 1e-5."""
    img = _ramp(torch.float64, offset=60.0)
    out = warp(img, _field(torch.float64, 0.3))
    ref = (torch.arange(N, dtype=torch.float64) + 0.3).clamp(max=N - 1) - 60.0
    assert out.dtype == torch.float64
    assert (out[0, 0, :, 1, 1] - ref).abs().max() < 1e-12


def test_compose_and_sample_at_points_float64_accurate():
    a = _field(torch.float64, 0.3)
    b = _ramp(torch.float64, offset=60.0).expand(1, 3, N, 3, 3).contiguous() * 1e-3
    c = compose(a, b)  # a + b(x + a): channel 0 is 0.3 + 1e-3 (i + 0.3 - 60) below the last voxel
    i = torch.arange(N - 1, dtype=torch.float64)
    assert (c[0, 0, :N - 1, 1, 1] - (0.3 + 1e-3 * (i + 0.3 - 60.0))).abs().max() < 1e-13
    pts = torch.tensor([[100.3, 1.0, 1.0], [0.123456789, 0.5, 2.0]], dtype=torch.float64)
    s = sample_at_points(_ramp(torch.float64, offset=100.0), pts)
    assert s.dtype == torch.float64
    assert (s[:, 0] - (pts[:, 0] - 100.0)).abs().max() < 1e-12


def test_warp_between_grids_float64_accurate():
    """Same grid on both sides (0.7 mm voxels, an off-centre origin), a 0.3 voxel shift: float64 accuracy."""
    A = np.diag([0.7, 0.7, 0.7, 1.0])
    A[:3, 3] = [-40.3, -1.1, -1.1]
    out = warp_between_grids(_ramp(torch.float64, offset=60.0), A, _field(torch.float64, 0.3), A)
    ref = (torch.arange(N, dtype=torch.float64) + 0.3).clamp(max=N - 1) - 60.0
    assert (out[0, 0, :, 1, 1] - ref).abs().max() < 1e-11


# ----------------------------------------------------------------------------- handled: half precision
@pytest.mark.parametrize("dtype", HALF)
def test_warp_half_image_float32_field_within_one_ulp(dtype):
    """A half-precision image warped by a float32 field (the case mended by the gradient walk): samples at
    the float32 positions, so a shift by 0.25 (exact) of the ramp ``i - 100`` is within one ulp of its dtype."""
    out = warp(_ramp(dtype, offset=100.0), _field(torch.float32, 0.25))
    ref = (torch.arange(N, dtype=torch.float64) + 0.25).clamp(max=N - 1) - 100.0
    assert out.dtype == dtype
    assert ((out[0, 0, :, 1, 1].double() - ref).abs() <= _ulp(ref, dtype)).all()


# ----------------------------------------------------------------------------- bugs
HALF_FIELD_POSITIONS = ("BUG: warp.py warp_unchecked builds the identity grid and the grid displacement in the "
                        "field's dtype (identity_grid(dtype=floating_dtype(disp_vox))): a float16 / bfloat16 field "
                        "puts the sampling positions 2 i / (n - 1) - 1 on that dtype's grid, up to a quarter voxel "
                        "off at 128 voxels (bfloat16), so a zero field moves the image; compute the positions in "
                        "promote_types(field dtype, float32) and answer in the image's dtype")


@pytest.mark.parametrize("image_dtype", [torch.float32, torch.float64, *HALF])
@pytest.mark.parametrize("field_dtype", HALF)
def test_warp_half_field_zero_is_identity(image_dtype, field_dtype):
    """A zero half-precision field samples every voxel at its own centre: the ramp comes back unchanged
    (its whole numbers are exact in every dtype here). Found: off by up to 0.246 (bfloat16 field) and
    0.031 (float16 field) for a float32 image."""
    img = _ramp(image_dtype, offset=100.0)
    out = warp(img, _field(field_dtype, 0.0))
    assert (out.double() - img.double()).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", HALF)
def test_compose_half_fields_zero_first_field(dtype):
    """``compose(0, b) = b``: found off by up to 0.25 voxel-values of the ramp ``i - 100`` (bfloat16), where
    one ulp of the answer at |b| < 1 is 1/128 or less."""
    b = _ramp(dtype, offset=100.0).expand(1, 3, N, 3, 3).contiguous()
    c = compose(_field(dtype, 0.0), b)
    ref = b.double()
    assert ((c.double() - ref).abs() <= _ulp(ref, dtype)).all()


@pytest.mark.parametrize("image_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("field_dtype", HALF)
def test_warp_between_grids_half_field_zero_is_identity(image_dtype, field_dtype):
    A = np.diag([0.7, 0.7, 0.7, 1.0])
    A[:3, 3] = [-40.3, -1.1, -1.1]
    img = _ramp(image_dtype, offset=100.0)
    out = warp_between_grids(img, A, _field(field_dtype, 0.0), A)
    assert (out.double() - img.double()).abs().max() < 1e-3


@pytest.mark.parametrize("dtype", HALF)
def test_sample_at_points_half_field_float_points(dtype):
    pts = torch.tensor([[100.3, 1.0, 1.0], [20.7, 1.0, 1.0]], dtype=torch.float32)
    s = sample_at_points(_ramp(dtype, offset=100.0), pts)
    ref = pts[:, 0].double() - 100.0
    assert s.dtype == dtype
    assert ((s[:, 0].double() - ref).abs() <= _ulp(ref, dtype)).all()


# ----------------------------------------------------------------------------- knn: the |a|^2 + |b|^2 - 2ab expansion
def _cluster_far_from_origin(dtype, seed: int = 0) -> torch.Tensor:
    """150 points: 50 spread over [-200, 200]^3 mm (the origin inside the cloud's box, so knn_indices does not
    shift it) and 100 in a 4 mm cube at 190 mm (about 0.9 mm apart), as keypoints of a scan in world mm."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.rand(50, 3, generator=g, dtype=torch.float64) * 400 - 200
    cluster = 190.0 + torch.rand(100, 3, generator=g, dtype=torch.float64) * 4.0
    return torch.cat([spread, cluster]).to(dtype)


def _excess_distance(points: torch.Tensor, k: int) -> float:
    """Largest amount by which a returned neighbour of a cluster point is farther (float64 distances of the
    given values) than the true k-th nearest one in its rank."""
    q = points[50:]
    idx = knn_indices(q, points, k)
    d = (q.double()[:, None] - points.double()[None]).norm(dim=-1)
    return float((d.gather(1, idx) - d.topk(k, dim=1, largest=False).values).abs().max())


def test_knn_float64_far_cluster_exact():
    """float64 points: the expansion's cancellation at 190 mm is 1e-11 mm^2, far below the 0.9 mm spacing."""
    assert _excess_distance(_cluster_far_from_origin(torch.float64), 4) < 1e-9


@pytest.mark.parametrize("dtype", HALF)
def test_knn_half_points_exact_on_their_values(dtype):
    """Half-precision points searched in float32: the rounded coordinates lie on a grid of 1/8 mm (float16)
    to 1 mm (bfloat16) at 190 mm, far above float32's cancellation there: the true neighbours of the given
    values (ties aside: distances equal, excess 0)."""
    assert _excess_distance(_cluster_far_from_origin(dtype), 4) < 1e-6


def test_knn_float32_far_cluster_true_neighbours():
    assert _excess_distance(_cluster_far_from_origin(torch.float32), 4) < 1e-3


# ----------------------------------------------------------------------------- frames conversions
_AFFINE = torch.tensor([[0.7, 0.0, 0.0, -40.3], [0.0, 0.8, 0.0, -1.1], [0.0, 0.0, 1.3, 17.9], [0.0, 0.0, 0.0, 1.0]],
                       dtype=torch.float64)
_SPACING = torch.tensor([0.7, 0.8, 1.3], dtype=torch.float64)
_BOX = frames.UnitBox((-123.4, -5.0, -5.0), (250.0, 100.0, 100.0))


def _conversions():
    """(name, function of the points, float64 reference of the same values) for the frames conversions."""
    box_lo = torch.tensor(_BOX.lo_mm, dtype=torch.float64)
    box_half = torch.tensor(_BOX.extent_mm, dtype=torch.float64) / 2
    return [
        ("voxel_to_world", lambda p: frames.voxel_to_world(p, _AFFINE),
         lambda p: p @ _AFFINE[:3, :3].T + _AFFINE[:3, 3]),
        ("world_to_voxel", lambda p: frames.world_to_voxel(p, _AFFINE), lambda p: (p - _AFFINE[:3, 3]) / _SPACING),
        ("voxel_to_grid", lambda p: frames.voxel_to_grid(p, (128, 128, 128)), lambda p: (2 * p / 127 - 1).flip(-1)),
        ("mm_to_unit", _BOX.mm_to_unit, lambda p: (p - box_lo) / box_half - 1),
    ]


def _points(dtype) -> torch.Tensor:
    """200 points in [0, 127)^3 (voxels or mm), rounded to ``dtype``."""
    g = torch.Generator().manual_seed(0)
    return (torch.rand(200, 3, generator=g, dtype=torch.float64) * 127).to(dtype)


@pytest.mark.parametrize("index", range(4), ids=[c[0] for c in _conversions()])
def test_frames_float64_conversions_accurate(index):
    _, convert, reference = _conversions()[index]
    p = _points(torch.float64)
    out = convert(p)
    assert out.dtype == torch.float64
    assert (out - reference(p)).abs().max() < 1e-12


@pytest.mark.parametrize("index", range(4), ids=[c[0] for c in _conversions()])
@pytest.mark.parametrize("dtype", HALF)
def test_frames_half_conversions_within_one_ulp(dtype, index):
    _, convert, reference = _conversions()[index]
    p = _points(dtype)
    out, ref = convert(p), reference(p.double())
    assert out.dtype == dtype
    assert ((out.double() - ref).abs() <= _ulp(ref, dtype)).all()


# ----------------------------------------------------------------------------- dense.convex resampling
def _resampled_ramp(dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A field whose channel 0 is ``i - 2`` on 128 voxels, upsampled 2x (ratio 0.5) to 255 voxels: output
    voxel ``x`` lies at source ``x / 2`` and its displacement is rescaled by 2, so channel 0 is ``x - 4``
    exactly (whole numbers up to 250: exact in every dtype here; small near the first voxel, where a grid
    coordinate near -1 rounds the most)."""
    src = _ramp(torch.float64, offset=2.0).expand(1, 3, N, 3, 3).contiguous().to(dtype)
    from cyclereg.dense.convex import resample_disp
    out = resample_disp(src, (2 * N - 1, 3, 3), 0.5)
    return out[0, 0, :, 1, 1].double(), torch.arange(2 * N - 1, dtype=torch.float64) - 4.0


def test_resample_disp_float64_accurate():
    got, ref = _resampled_ramp(torch.float64)
    assert (got - ref).abs().max() < 1e-11


@pytest.mark.parametrize("dtype", HALF)
def test_resample_disp_half_exact_positions(dtype):
    got, ref = _resampled_ramp(dtype)
    assert ((got - ref).abs() <= _ulp(ref, dtype)).all()


# ----------------------------------------------------------------------------- clouds: lbp, augment, registration
def _min_convolution_case(dtype):
    """64 edges of 32 source and 32 destination labels: displacements of about 0.25 (unit frame) +- 0.05,
    beliefs in [0, 0.5), alpha 10; and the float64 brute-force minimum of the same (rounded) values."""
    g = torch.Generator().manual_seed(0)
    b = (torch.rand(64, 32, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    src = (0.25 + torch.randn(64, 32, 3, generator=g, dtype=torch.float64) * 0.05).to(dtype)
    dst = (0.25 + torch.randn(64, 32, 3, generator=g, dtype=torch.float64) * 0.05).to(dtype)
    pair = (src.double()[:, :, None, :] - dst.double()[:, None, :, :]).pow(2).sum(-1)
    return b, src, dst, (b.double()[:, :, None] + 10.0 * pair).min(1).values


@pytest.mark.parametrize("prune_from", [None, 8])
def test_min_convolution_float64_exact_minimum(prune_from):
    from cyclereg.clouds.lbp import min_convolution
    b, src, dst, ref = _min_convolution_case(torch.float64)
    out = min_convolution(b, src, dst, 10.0, prune_from=prune_from)
    assert out.dtype == torch.float64
    assert (out - ref).abs().max() < 1e-14


@pytest.mark.parametrize("prune_from", [None, 8])
@pytest.mark.parametrize("dtype", HALF)
def test_min_convolution_half_within_few_ulps(dtype, prune_from):
    from cyclereg.clouds.lbp import min_convolution
    b, src, dst, ref = _min_convolution_case(dtype)
    out = min_convolution(b, src, dst, 10.0, prune_from=prune_from)
    assert out.dtype == dtype
    assert ((out.double() - ref).abs() <= 4 * _ulp(ref, dtype)).all()  # the value at the arg-min: a few roundings


@pytest.mark.parametrize("dtype", HALF)
def test_displacements_back_half_within_one_ulp(dtype):
    """The docstring's "computed in float32 for half precision": one rounding of the float32 answer."""
    from cyclereg.clouds.augment import displacements_back
    g = torch.Generator().manual_seed(1)
    A = torch.tensor([[1.02, 0.01, 0.0], [0.0, 0.98, 0.02], [0.01, 0.0, 1.01]], dtype=torch.float64)
    disp = (torch.randn(100, 3, generator=g, dtype=torch.float64) * 5).to(dtype)
    out = displacements_back(disp, A)
    ref = disp.double() @ torch.linalg.inv(A).T
    assert out.dtype == dtype
    assert ((out.double() - ref).abs() <= _ulp(ref, dtype)).all()


def test_displacements_back_and_apply_affine_float64_accurate():
    from cyclereg.clouds.augment import apply_affine, displacements_back
    g = torch.Generator().manual_seed(1)
    A = torch.tensor([[1.02, 0.01, 0.0], [0.0, 0.98, 0.02], [0.01, 0.0, 1.01]], dtype=torch.float64)
    t = torch.tensor([-3.0, 2.0, 1.5], dtype=torch.float64)
    p = torch.randn(100, 3, generator=g, dtype=torch.float64) * 50
    assert (apply_affine(p, A.float(), t.float()) - (p @ A.float().double().T + t)).abs().max() < 1e-12
    assert (displacements_back(p, A) - p @ torch.linalg.inv(A).T).abs().max() < 1e-12


@pytest.mark.parametrize("dtype", HALF)
def test_apply_affine_half_within_one_ulp(dtype):
    from cyclereg.clouds.augment import apply_affine
    g = torch.Generator().manual_seed(0)
    A = torch.tensor([[1.02, 0.01, 0.0], [0.0, 0.98, 0.02], [0.01, 0.0, 1.01]], dtype=torch.float64)
    t = torch.tensor([-3.0, 2.0, 1.5], dtype=torch.float64)
    p = (torch.rand(50, 3, generator=g, dtype=torch.float64) * 100).to(dtype)
    out = apply_affine(p, A, t)
    ref = p.double() @ A.T + t
    assert out.dtype == dtype
    assert ((out.double() - ref).abs() <= _ulp(ref, dtype)).all()


# ----------------------------------------------------------------------------- metrics, similarity, keypoints, volumeio
@pytest.mark.parametrize("dtype", HALF)
def test_jacobian_determinant_half_rounded_once(dtype):
    """Computed in float64, answered in the field's dtype: half an ulp of the exact determinant of the same values
    (plus a hair: torch casts float64 to float16 through float32, a double rounding of at most 2^-14 ulp)."""
    from cyclereg.metrics import jacobian_determinant
    g = torch.Generator().manual_seed(0)
    disp = (torch.randn(1, 3, 10, 10, 10, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    J, ref = jacobian_determinant(disp), jacobian_determinant(disp.double())
    assert J.dtype == dtype
    assert ((J.double() - ref).abs() <= 0.501 * _ulp(ref, dtype)).all()


def test_sdlogj_float64_field_not_rounded_to_float32():
    """A float64 field's tiny deformation (1e-9 voxel) is seen: float32 would round it away (the figures are 0)."""
    from cyclereg.metrics import sdlogj
    g = torch.Generator().manual_seed(0)
    disp = torch.randn(1, 3, 8, 8, 8, generator=g, dtype=torch.float64) * 1e-9
    figures = sdlogj(disp)
    assert 1e-11 < figures["std_logj"] < 1e-8
    assert sdlogj(disp.float())["std_logj"] < figures["std_logj"] / 10


@pytest.mark.parametrize("dtype", HALF)
def test_mind_and_ncc_half_within_one_ulp(dtype):
    """Computed in float32 (the docstring), answered in the image's dtype: MIND descriptors (in [0, 1]) and the
    NCC loss within one ulp of the float64 answer for the same values."""
    from cyclereg.dense.similarity import mind_ssc, ncc_loss
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 1, 12, 12, 12, generator=g, dtype=torch.float64).to(dtype)
    m, rm = mind_ssc(img), mind_ssc(img.double())
    assert m.dtype == dtype and ((m.double() - rm).abs() <= _ulp(rm, dtype)).all()
    loss, rl = ncc_loss(img, img.flip(2)), ncc_loss(img.double(), img.double().flip(2))
    assert loss.dtype == dtype and abs(float(loss) - float(rl)) <= float(_ulp(rl, dtype))


def test_mind_float64_not_float32():
    """float64 MIND is not the float32 one cast up (no hidden .float()): they differ by float32 rounding."""
    from cyclereg.dense.similarity import mind_ssc
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 1, 10, 10, 10, generator=g, dtype=torch.float64)
    m64, m32 = mind_ssc(img), mind_ssc(img.float()).double()
    assert m64.dtype == torch.float64
    assert 0 < (m64 - m32).abs().max() < 1e-5


def test_foerstner_distinctiveness_dtypes():
    """float64 stays float64 (not the float32 map cast up); float16 is computed in float32, bitwise as the same
    values given in float32 (the docstring)."""
    from cyclereg.keypoints.foerstner import distinctiveness
    g = torch.Generator().manual_seed(0)
    img = torch.rand(16, 16, 16, generator=g, dtype=torch.float64)
    d64, d32 = distinctiveness(img, (1.0, 1.0, 1.0), 1.5), distinctiveness(img.float(), (1.0, 1.0, 1.0), 1.5)
    assert d64.dtype == torch.float64
    rel = float((d64 - d32.double()).abs().max() / d64.abs().max())
    assert 0 < rel < 1e-5
    half = img.half()
    assert torch.equal(distinctiveness(half, (1.0, 1.0, 1.0), 1.5), distinctiveness(half.float(), (1.0, 1.0, 1.0), 1.5))


@pytest.mark.parametrize("dtype", [*HALF, torch.float64])
def test_write_nifti_half_exact_float64_rounded_once(tmp_path, dtype):
    """Written as float32 (the docstring): half-precision values come back exactly, float64 ones as their
    nearest float32."""
    from cyclereg.volumeio import read_nifti, write_nifti
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(4, 5, 6, generator=g, dtype=torch.float64) * 1000 - 500).to(dtype)
    write_nifti(tmp_path / "v.nii.gz", x, np.eye(4))
    back = read_nifti(tmp_path / "v.nii.gz").data
    assert torch.equal(back, x.float())


@pytest.mark.parametrize("dtype", [torch.float64, *HALF])
def test_tps_reproduces_affine_field(dtype):
    """A TPS fitted to an affine displacement reproduces it (solved and evaluated in float64): float64 query
    points to 1e-9 mm (float32 would give 1e-5), half-precision ones within an ulp of the answer."""
    from cyclereg.clouds.tps import ThinPlateSpline
    g = torch.Generator().manual_seed(0)
    fixed = torch.rand(60, 3, generator=g, dtype=torch.float64) * 2 - 1
    A = torch.tensor([[0.2, 0.1, 0.0], [0.0, -0.2, 0.2], [0.1, 0.0, 0.1]], dtype=torch.float64)
    t = torch.tensor([-0.03, 0.02, 0.015], dtype=torch.float64)
    spline = ThinPlateSpline.fit(fixed, fixed @ A.T + t, regularisation=0.1)
    q = (torch.rand(50, 3, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    out, ref = spline(q), q.double() @ A.T + t
    assert out.dtype == dtype
    if dtype == torch.float64:
        assert (out - ref).abs().max() < 1e-9
    else:
        assert ((out.double() - ref).abs() <= _ulp(ref, dtype)).all()


def _dense_case(dtype):
    """A cloud registration of 60 fixed points in [0, 190) mm with the displacement 0.2 (x - 95 mm) (which the
    TPS reproduces), rounded to ``dtype``, and the same registration of those values in float64; the dense
    field on a 128 x 4 x 4 grid of 1.5 mm voxels evaluated at every voxel (grid_step 1: no upsampling)."""
    from cyclereg.clouds.pipeline import CloudRegistration
    from cyclereg.clouds.tps import TPSConfig
    g = torch.Generator().manual_seed(0)
    fixed = (torch.rand(60, 3, generator=g, dtype=torch.float64) * 190).to(dtype)
    disp = (0.2 * (fixed.double() - 95.0)).to(dtype)
    box, tps = frames.UnitBox.around(fixed), TPSConfig(grid_step=1)
    reg = CloudRegistration(fixed_mm=fixed, displacements_mm=disp, box=box, tps=tps)
    reg64 = CloudRegistration(fixed_mm=fixed.double(), displacements_mm=disp.double(), box=box, tps=tps)
    affine, shape = np.diag([1.5, 1.5, 1.5, 1.0]), (N, 4, 4)
    return reg.dense(affine, shape), reg64.dense(affine, shape)


def test_cloud_registration_dense_float64_exact():
    got, ref = _dense_case(torch.float64)
    assert got.dtype == torch.float64
    i = torch.arange(N, dtype=torch.float64)
    assert (ref[0, 0, :, 1, 1] - 0.2 * (1.5 * i - 95.0) / 1.5).abs().max() < 1e-9


@pytest.mark.parametrize("dtype", HALF)
def test_cloud_registration_dense_half_within_one_ulp(dtype):
    got, ref = _dense_case(dtype)
    assert got.dtype == dtype
    assert ((got.double() - ref).abs() <= _ulp(ref, dtype)).all()


def _spread_case(dtype):
    """Two members of an ensemble registration: 0.2 (x - 95 mm) and that plus 0.5 mm along x, rounded to
    ``dtype``; their spread at 40 query points (the same registration of those values in float64 as reference)."""
    from cyclereg.clouds.pipeline import CloudRegistration
    from cyclereg.clouds.tps import TPSConfig
    g = torch.Generator().manual_seed(1)
    fixed = (torch.rand(60, 3, generator=g, dtype=torch.float64) * 190).to(dtype)
    first = (0.2 * (fixed.double() - 95.0)).to(dtype)
    second = (first.double() + torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64)).to(dtype)
    query = (torch.rand(40, 3, generator=g, dtype=torch.float64) * 190).to(dtype)
    box, tps = frames.UnitBox.around(fixed), TPSConfig()
    regs = [CloudRegistration(fixed_mm=f, displacements_mm=(a + b) / 2, box=box, tps=tps,
                              member_displacements_mm=(a, b))
            for f, a, b in ((fixed, first, second), (fixed.double(), first.double(), second.double()))]
    return [(r.spread_at(query), r.spread_mm) for r in regs]


@pytest.mark.parametrize("dtype", HALF)
def test_member_spread_half_within_one_ulp(dtype):
    """Mended after the walk (its fix helper noticed it): the members' spread of a half-precision ensemble was
    fitted, evaluated and averaged in half precision; it is computed in float32 and answered in the dtype."""
    (got_at, got_fixed), (ref_at, ref_fixed) = _spread_case(dtype)
    assert got_at.dtype == got_fixed.dtype == dtype
    assert ((got_at.double() - ref_at).abs() <= _ulp(ref_at, dtype)).all()
    assert ((got_fixed.double() - ref_fixed).abs() <= _ulp(ref_fixed, dtype)).all()


def test_warp_float64_image_float32_zero_field_exact():
    img = _ramp(torch.float64, offset=100.0)
    out = warp(img, _field(torch.float32, 0.0))
    assert (out - img).abs().max() < 1e-12


@pytest.mark.parametrize("dtype, size", [(torch.bfloat16, 300), (torch.float16, 2048)])
def test_inside_grid_half_bound_exact(dtype, size):
    points = torch.tensor([[size, 0.0, 0.0], [size - 2, 0.0, 0.0]], dtype=dtype)  # both exact in dtype
    assert frames.inside_grid(points, (size, 10, 10)).tolist() == [False, True]


def test_inside_grid_float64_bound_exact():
    """float64 (and float32) points half a voxel and a hair beyond the last centre are outside."""
    for dtype in (torch.float32, torch.float64):
        eps = 1e-9 if dtype == torch.float64 else 1e-4
        points = torch.tensor([[299.5 + eps, 0.0, 0.0], [299.5, 0.0, 0.0], [-0.5 - eps, 0.0, 0.0]], dtype=dtype)
        assert frames.inside_grid(points, (300, 10, 10)).tolist() == [False, True, False]


@pytest.mark.parametrize("shift", [0.375, -0.375])
def test_warp_labels_bfloat16_field_below_half_voxel_keeps_labels(shift):
    """A shift under half a voxel keeps every label (nearest neighbour), at the border too (border clamp of
    the edge voxel inside the half-voxel band; zeros padding starts beyond it)."""
    from cyclereg.warp import warp_labels
    labels = torch.arange(N).view(1, 1, N, 1, 1).expand(1, 1, N, 3, 3).contiguous()
    out = warp_labels(labels, _field(torch.bfloat16, shift))
    assert torch.equal(out, labels)


def _soft_argmin_case(dtype):
    """50 points of 64 candidates (+-0.05 unit), beliefs in [5, 6) (min-sum beliefs carry the unary cost), the
    default beta 50, rounded to ``dtype``; and the float64 read-out of those values."""
    from cyclereg.clouds.lbp import soft_argmin
    g = torch.Generator().manual_seed(0)
    cand = (0.05 * torch.randn(50, 64, 3, generator=g, dtype=torch.float64)).to(dtype)
    belief = (5 + torch.rand(50, 64, generator=g, dtype=torch.float64)).to(dtype)
    return soft_argmin(cand, belief, 50.0), soft_argmin(cand.double(), belief.double(), 50.0)


def _coupled_convex_case(dtype):
    """A cost volume of the default radius (125 candidates) on 6^3 voxels with costs in [2, 3) (a mean absolute
    difference of unit-spread features), rounded to ``dtype``; and the float64 field of those costs."""
    from cyclereg.dense.config import ConvexConfig
    from cyclereg.dense.convex import coupled_convex
    cfg = ConvexConfig()
    g = torch.Generator().manual_seed(0)
    cost = (2 + torch.rand(1, (2 * cfg.radius + 1) ** 3, 6, 6, 6, generator=g, dtype=torch.float64)).to(dtype)
    return coupled_convex(cost, cfg), coupled_convex(cost.double(), cfg)


def _normalised(which: str, dtype):
    """5000 values of 8 channels, mean 3 and spread 1, rounded to ``dtype``: ``standardize`` (as ``(1, 8, D, H, W)``
    features) or ``CloudNorm`` (as ``(5000, 8)`` rows); and the float64 answer for the same values."""
    g = torch.Generator().manual_seed(0)
    x = (3 + torch.randn(5000, 8, generator=g, dtype=torch.float64)).to(dtype)
    if which == "standardize":
        from cyclereg.dense.convex import standardize
        f = x.T.reshape(1, 8, 10, 25, 20)
        return standardize(f), standardize(f.double())
    from cyclereg.clouds.features import CloudNorm
    return CloudNorm()(x), CloudNorm()(x.double())


@pytest.mark.parametrize("which", ["standardize", "CloudNorm"])
def test_normalisation_float64_accurate(which):
    got, ref = _normalised(which, torch.float64)
    assert got.dtype == torch.float64
    assert (got.mean(dim=0 if which == "CloudNorm" else (2, 3, 4))).abs().max() < 1e-12


SOFT_MINIMA = {"soft_argmin": _soft_argmin_case, "coupled_convex": _coupled_convex_case}
"""The soft minima: ``case(dtype) -> (answer for the values in dtype, float64 answer for the same values)``."""

HALF_CASES = {**SOFT_MINIMA, "standardize": lambda dtype: _normalised("standardize", dtype),
              "CloudNorm": lambda dtype: _normalised("CloudNorm", dtype)}


@pytest.mark.parametrize("case", SOFT_MINIMA)
def test_soft_minimum_float64_is_float64(case):
    got, ref = SOFT_MINIMA[case](torch.float64)
    assert got.dtype == torch.float64 and torch.equal(got, ref)


@pytest.mark.parametrize("case", HALF_CASES)
@pytest.mark.parametrize("dtype", HALF)
def test_half_within_one_ulp(dtype, case):
    got, ref = HALF_CASES[case](dtype)
    assert got.dtype == dtype
    assert ((got.double() - ref).abs() <= _ulp(ref, dtype)).all()
