"""Invariances of whole registrations, keypoint clouds and dense volumes (invariance walk, 2026-12-07).

Audited: ``register_clouds`` (plain, re-centred, test-time augmented, two-network ensembles averaged and
joint, with and without a stored training box), the dense ``register`` pipeline, the file-level
``register_volume_files`` (common affine offsets, NIfTI spatial units, ``--resample-moving``) and
``evaluate`` on identity pairs. Each test checks an invariant derived by hand from the package docstring
(world mm, fixed -> moving, features normalised per cloud so a common or a pure translation drops out):

* translating both clouds (both affines) by c leaves the displacements unchanged: to float64 rounding in
  float64, to the float32 spacing of the coordinates themselves (ulp(c)) in float32;
* permuting the fixed points permutes the rows alike, permuting the moving points changes nothing;
* a pure translation t is recovered as t, and the swapped pair as -t (the two compose to the identity);
* one or two intra-op threads, float32 or float64, a batch of two or two batches of one: the same field
  to the stated rounding;
* the same scan with its header in metres or microns gives the same world-mm field as in mm;
* the dense CNN is not equivariant to axis flips and permutations by design (``_check_orientation``),
  so for every orientation the identity pair is checked instead (exactly zero with one warp and
  inverse consistency);
* ``evaluate`` of an identity pair reports TRE 0 and SDlogJ 0.

Bugs pinned (strict xfails until they were mended):

* ``evaluate`` on a keypoint dataset whose keypoints lie wholly outside its ``volume_shape_zyx`` grid scores
  SDlogJ on that empty grid (the TPS extrapolated 1e4 mm away), silently, where ``register --reference``
  refuses such a cloud;
* the same scan with its header in metres (or mm with a spacing float32 cannot hold, 1.2 mm) gets another
  Foerstner NMS half-width at a half-voxel tie (``frames.half_width_voxels``: 3 mm on 2 mm voxels is 1.5 ->
  2 voxels, but 0.002 m reads back as 2.0000001 mm -> 1), so other keypoints and another
  ``--via-keypoints`` registration.
"""

from __future__ import annotations

import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cyclereg.clouds.features import FeatureEnsemble, GraphNetConfig, build_graph_net
from cyclereg.clouds.lbp import LBPConfig
from cyclereg.clouds.pipeline import CloudRegConfig, register_clouds
from cyclereg.dense.config import DensePipelineConfig
from cyclereg.dense.network import FeatureNetConfig, random_feature_net
from cyclereg.dense.pipeline import predict_displacement, register
from cyclereg.errors import InputError
from cyclereg.frames import UnitBox
from cyclereg.pointio import write_points

from conftest import intraop_threads

pytestmark = pytest.mark.usefixtures("one_intraop_thread")

# ============================================================================= keypoint clouds
CFG = CloudRegConfig(net=GraphNetConfig(channels=(8, 8), out_channels=8, k_fixed=5),
                     lbp=LBPConfig(num_candidates=8, graph_k=4, iterations=2))
VARIANTS = {
    "plain": {},
    "recentred": {"recentre_passes": 2, "recentre_candidates": 12},
    "tta": {"tta_passes": 2},
    "training-box": {"training_box": UnitBox((-10.0, -10.0, -10.0), (80.0, 80.0, 80.0))},
}


def _pair():
    """60 random fixed points in a 50 mm cube (no kNN ties), moving = fixed + 0.5 mm noise + a shift, plus
    20 unmatched moving points (float64)."""
    g = torch.Generator().manual_seed(0)
    fixed = torch.rand(60, 3, generator=g, dtype=torch.float64) * 50
    moving = fixed + 0.5 * torch.randn(60, 3, generator=g, dtype=torch.float64) + torch.tensor([1.0, 2.0, 0.5],
                                                                                              dtype=torch.float64)
    return fixed, torch.cat([moving, torch.rand(20, 3, generator=g, dtype=torch.float64) * 50])


def _model(variant: str, fusion: str | None):
    cfg = dataclasses.replace(CFG, **VARIANTS[variant])
    if fusion is None:
        return build_graph_net(cfg.net, seed=0).eval().double(), cfg
    net = FeatureEnsemble(cfg.net, 2)
    for i, member in enumerate(net.members):
        member.load_state_dict(build_graph_net(cfg.net, seed=i).state_dict())
    return net.eval().double(), dataclasses.replace(cfg, ensemble_size=2, ensemble_fusion=fusion)


MODELS = [pytest.param(v, f, id=f"{v}-{f or 'single'}") for v in VARIANTS for f in (None, "joint")] + \
    [pytest.param("plain", "average", id="plain-average")]


@pytest.mark.parametrize("variant, fusion", MODELS)
def test_cloud_registration_ignores_a_common_offset_and_the_point_order(variant, fusion):
    """Both clouds moved by c = (1e5, -1e5, 3e4) mm: the same displacements to 1e-8 mm (float64; the
    features are normalised per cloud, the LBP sees differences only, the box moves with the clouds or is
    re-centred on them). Fixed rows permuted: the rows permuted alike; moving rows permuted: the same
    displacements (1e-12 mm: summation order only)."""
    net, cfg = _model(variant, fusion)
    fixed, moving = _pair()
    want = register_clouds(fixed, moving, net, cfg).displacements_mm
    c = torch.tensor([1e5, -1e5, 3e4], dtype=torch.float64)
    torch.testing.assert_close(register_clouds(fixed + c, moving + c, net, cfg).displacements_mm, want,
                               atol=1e-8, rtol=0)
    g = torch.Generator().manual_seed(1)
    pf, pm = torch.randperm(60, generator=g), torch.randperm(80, generator=g)
    torch.testing.assert_close(register_clouds(fixed[pf], moving, net, cfg).displacements_mm, want[pf],
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(register_clouds(fixed, moving[pm], net, cfg).displacements_mm, want,
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize("variant, fusion", MODELS)
def test_cloud_translation_its_swap_and_the_identity(variant, fusion):
    """moving = fixed + t: displacements t; the swapped pair: -t (they compose to the identity); fixed ==
    moving: 0. Tolerance 1e-4 mm: the LBP's displacement is a soft expectation over candidates, whose
    residual weight off the exact match grows as the unit frame grows (1e-9 mm in the clouds' own box,
    ~1e-5 mm in an 80 mm training box)."""
    net, cfg = _model(variant, fusion)
    fixed, _ = _pair()
    t = torch.tensor([1.0, -2.0, 0.7], dtype=torch.float64)
    forward = register_clouds(fixed, fixed + t, net, cfg).displacements_mm
    backward = register_clouds(fixed + t, fixed, net, cfg).displacements_mm
    torch.testing.assert_close(forward, t.expand(60, 3), atol=1e-4, rtol=0)
    torch.testing.assert_close(forward + backward, torch.zeros(60, 3, dtype=torch.float64), atol=1e-4, rtol=0)
    assert register_clouds(fixed, fixed.clone(), net, cfg).displacements_mm.abs().max() < 1e-4


@pytest.mark.parametrize("c", [1e4, 1e5])
def test_float32_clouds_far_from_the_origin_agree_to_the_spacing_of_their_coordinates(c):
    """float32 clouds moved by c: the displacements move by at most 2 ulp(c) (0.002 mm at 1e4, 0.016 mm at
    1e5): the coordinates themselves are stored only to ulp(c), so no finer agreement is possible."""
    net = build_graph_net(CFG.net, seed=0).eval()
    fixed, moving = (p.float() for p in _pair())
    want = register_clouds(fixed, moving, net, CFG).displacements_mm
    shift = torch.tensor([c, -c, c / 3])
    got = register_clouds(fixed + shift, moving + shift, net, CFG).displacements_mm
    ulp = float(np.spacing(np.float32(c)))
    assert (got - want).abs().max() <= 2 * ulp


@pytest.mark.parametrize("variant, fusion", [("plain", None), ("tta", "joint")])
def test_cloud_registration_with_two_threads_and_in_float32(variant, fusion):
    """Two intra-op threads: the same displacements to 1e-12 mm (float64 summation order); the network and
    clouds in float32: within 1e-4 mm of float64 (coordinates up to 50 mm, float32 eps 6e-8: ~3e-6 mm per
    operation, measured 3e-5 at most)."""
    net, cfg = _model(variant, fusion)
    fixed, moving = _pair()
    want = register_clouds(fixed, moving, net, cfg).displacements_mm
    with intraop_threads(2):
        torch.testing.assert_close(register_clouds(fixed, moving, net, cfg).displacements_mm, want,
                                   atol=1e-12, rtol=0)
    got = register_clouds(fixed.float(), moving.float(), net.float(), cfg).displacements_mm
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=0)


# ============================================================================= dense pipeline
SMALL_NET = FeatureNetConfig(channels=(4, 4, 4), strides=(2, 1, 2), out_channels=4, adam_layer=1, adam_channels=4)


def _smooth(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, *shape, generator=g)
    for _ in range(3):
        x = F.avg_pool3d(F.pad(x, (1,) * 6, mode="replicate"), 3, stride=1)
    return x


def _dense_pair(shift=4):
    """24^3 crops of one smooth volume, the moving one ``shift`` voxels lower along j:
    moving(y + shift e_j) = fixed(y), so u = +shift e_j."""
    big = _smooth((40, 40, 40), 8)
    return (big[:, :, 8:32, 8:32, 8:32].contiguous(), big[:, :, 8:32, 8 - shift:32 - shift, 8:32].contiguous())


def _dense_cfg(**kw):
    return DensePipelineConfig(net=SMALL_NET, pad_multiple=4, **kw).validate()


@pytest.mark.parametrize("kw", [dict(warps=1, use_adam=False, use_ic=False), dict(warps=2, use_adam=True, use_ic=True)],
                         ids=["1warp", "defaults"])
def test_dense_translation_its_swap_threads_batch_and_float64(kw):
    """A 4-voxel shift along j: the inner mean field is +4 e_j (+-0.3 voxel), the swapped pair -4 e_j (they
    compose to the identity). Two threads: the same field to 1e-5 voxel (float32 summation order). One warp
    without Adam also: a batch of two pairs: bitwise each pair's own (register runs them one by one), predict_displacement to 1e-5
    voxel; float64 images and network: float32's field to 1e-4 voxel."""
    net, cfg = random_feature_net(SMALL_NET, 0), _dense_cfg(**kw)
    fixed, moving = _dense_pair()
    inner = (slice(None), slice(None), *(slice(6, -6),) * 3)
    want = register(fixed, moving, net, cfg)
    back = register(moving, fixed, net, cfg)
    e_j = torch.tensor([0.0, 4.0, 0.0])
    torch.testing.assert_close(want[inner].mean((0, 2, 3, 4)), e_j, atol=0.3, rtol=0)
    torch.testing.assert_close(back[inner].mean((0, 2, 3, 4)), -e_j, atol=0.3, rtol=0)
    with intraop_threads(2):
        torch.testing.assert_close(register(fixed, moving, net, cfg), want, atol=1e-5, rtol=0)
    if cfg.use_adam:  # batch and dtype: the one-warp pipeline (the Adam runs take the time)
        return
    both = register(torch.cat([fixed, moving]), torch.cat([moving, fixed]), net, cfg)
    assert torch.equal(both[:1], want) and torch.equal(both[1:], back)
    pred = predict_displacement(net, torch.cat([fixed, moving]), torch.cat([moving, fixed]), cfg)
    torch.testing.assert_close(pred[:1], predict_displacement(net, fixed, moving, cfg), atol=1e-5, rtol=0)
    torch.testing.assert_close(pred[1:], predict_displacement(net, moving, fixed, cfg), atol=1e-5, rtol=0)
    net64 = random_feature_net(SMALL_NET, 0).double()
    torch.testing.assert_close(register(fixed.double(), moving.double(), net64, cfg).float(), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("perm", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
@pytest.mark.parametrize("flip", [(), (0,), (1, 2)])
def test_a_volume_registered_to_itself_is_zero_in_every_orientation(perm, flip):
    """The CNN sees voxel arrays, so a flipped or axis-permuted pair is not registered equivariantly (by
    design: a trained model refuses another orientation). What must hold in every orientation: the
    identity pair gives exactly zero with one warp and inverse consistency (with Adam too: a zero start
    has a zero data gradient), and below 1e-5 voxel with two warps and no Adam (docs/benchmarks.md,
    "A scan registered to itself": warp(m, 0) is m only to rounding)."""
    img = _dense_pair()[0].permute(0, 1, *[p + 2 for p in perm])
    img = (img.flip([a + 2 for a in flip]) if flip else img).contiguous()
    net = random_feature_net(SMALL_NET, 0)
    for kw in (dict(warps=1, use_ic=True, use_adam=False), dict(warps=1, use_ic=True, use_adam=True)):
        disp = register(img, img.clone(), net, _dense_cfg(**kw))
        assert torch.equal(disp, torch.zeros_like(disp)), kw
    assert register(img, img.clone(), net, _dense_cfg(warps=2, use_ic=True, use_adam=False)).abs().max() < 1e-5


# ----------------------------------------------------------------------------- dense files
AFFINE = np.array([[0.0, -1.5, 0.0, 10.0], [2.0, 0.0, 0.0, -20.0], [0.0, 0.0, 1.0, 5.0], [0.0, 0.0, 0.0, 1.0]])


@pytest.fixture(scope="module")
def scan():
    """A smooth 32^3 float32 scan (intensities 0..1000 scaled)."""
    big = _smooth((48, 48, 48), 3)[0, 0].numpy()
    return (big - big.min()) / (big.max() - big.min()) * 1000.0


def _register_files(tmp_path, tag, fixed, moving, fixed_affine, moving_affine, unit=None, **kw):
    paths = []
    for name, arr, aff in (("f", fixed, fixed_affine), ("m", moving, moving_affine)):
        img = nib.Nifti1Image(np.ascontiguousarray(arr, dtype=np.float32), aff)
        if unit:
            img.header.set_xyzt_units(unit)
        paths.append(tmp_path / f"{tag}_{name}.nii.gz")
        nib.save(img, str(paths[-1]))
    from cyclereg.dense.api import register_volume_files

    out = tmp_path / f"out_{tag}"
    register_volume_files(paths[0], paths[1], out, warps=2, adam=True, ic=True, disp_mm=True, device="cpu", **kw)
    image = nib.load(str(out / "displacement.nii.gz"))
    assert image.header.get_xyzt_units()[0] == "mm"
    return np.asarray(image.dataobj)


@pytest.fixture(scope="module")
def shifted_scans(scan, tmp_path_factory):
    """(fixed, moving, field in mm of the pair on AFFINE): moving 4 voxels lower along j, so
    u = 4 e_j voxels = AFFINE[:3, :3] @ (0, 4, 0) = (-6, 0, 0) mm."""
    fixed, moving = scan[8:40, 10:42, 8:40], scan[8:40, 6:38, 8:40]
    return fixed, moving, _register_files(tmp_path_factory.mktemp("base"), "base", fixed, moving, AFFINE, AFFINE)


def test_dense_file_registration_finds_the_world_shift(shifted_scans):
    inner = shifted_scans[2][8:-8, 8:-8, 8:-8].reshape(-1, 3).mean(0)
    np.testing.assert_allclose(inner, [-6.0, 0.0, 0.0], atol=0.5)


@pytest.mark.parametrize("unit, scale, offset", [(None, 1.0, 1e5), ("meter", 1e-3, 0.0), ("meter", 1e-3, 1e5),
                                                 ("micron", 1e3, 0.0)])
def test_dense_file_registration_ignores_a_common_offset_and_the_header_unit(shifted_scans, tmp_path, unit, scale,
                                                                            offset):
    """Both affines moved by an offset (mm) and/or written in metres or microns (xyzt_units, the affine
    scaled to that unit): the same world-mm field to 1e-4 mm (float32 sform rounding of 1.5e-3 m is
    ~1e-10 m; the voxels and so the voxel field are identical, u_mm = A[:3, :3] u_vox)."""
    fixed, moving, want = shifted_scans
    aff = AFFINE.copy()
    aff[:3, 3] += np.array([offset, -offset, offset / 2])
    aff[:3, :] *= scale
    got = _register_files(tmp_path, "x", fixed, moving, aff, aff, unit=unit)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("offset", [0.0, 1e5])
def test_resample_moving_of_a_scan_placed_4_5_mm_lower_in_x(scan, tmp_path, offset):
    """The same array as fixed and moving, the moving affine 4.5 mm lower along world x (both affines at
    a common offset): --resample-moving gives u = (-4.5, 0, 0) mm inside (+-0.3 mm, 0.15 voxel of 2 mm), at
    1e5 mm as at 0 (float64 resampling: the same field to 1e-3 mm)."""
    arr = scan[8:40, 8:40, 8:40]
    fixed_affine = AFFINE.copy()
    fixed_affine[:3, 3] += [offset, offset, -offset]
    moving_affine = fixed_affine.copy()
    moving_affine[0, 3] -= 4.5
    got = _register_files(tmp_path, "r", arr, arr, fixed_affine, moving_affine, resample_moving=True)
    np.testing.assert_allclose(got[8:-8, 8:-8, 8:-8].reshape(-1, 3).mean(0), [-4.5, 0.0, 0.0], atol=0.3)


# ============================================================================= evaluate
B = torch.tensor([[0.05, 0.02, 0.0], [0.0, -0.04, 0.01], [0.03, 0.0, 0.02]], dtype=torch.float64)


def _keypoint_dataset(folder, offset=0.0, motion=True):
    """One pair in a 60 x 30 x 20 mm volume grid (first voxel at the origin); keypoints and landmarks
    moved by ``offset`` mm; moving = fixed + u(fixed) with u(x) = B (x - offset) + t (or the identity)."""
    g = torch.Generator().manual_seed(3)
    lo, size = torch.tensor([6.0, 4.0, 4.0], dtype=torch.float64), torch.tensor([48.0, 22.0, 12.0], dtype=torch.float64)
    fk = lo + size * torch.rand(80, 3, generator=g, dtype=torch.float64) + offset
    fl = lo + size * torch.rand(12, 3, generator=g, dtype=torch.float64) + offset

    def u(x):
        return (x - offset) @ B.T + torch.tensor([1.0, -0.5, 0.8], dtype=torch.float64) if motion else 0 * x

    entry = {"id": "c0"}
    for key, pts in {"fixed_keypoints": fk, "moving_keypoints": fk + u(fk), "fixed_landmarks": fl,
                     "moving_landmarks": fl + u(fl)}.items():
        write_points(folder / "c0" / f"{key}.csv", pts)
        entry[key] = f"c0/{key}.csv"
    (folder / "d.json").write_text(json.dumps({"name": "w", "pairs": [entry], "folds": [["c0"]],
                                               "volume_shape_zyx": [20, 30, 60], "spacing_zyx_mm": [1.0, 1.0, 1.0]}))
    return folder / "d.json"


def test_evaluate_of_an_identity_pair_reports_zero_tre_and_zero_sdlogj(tmp_path):
    """fixed == moving keypoints and landmarks, the random model: TRE 0 before and after, SDlogJ 0 and no
    folding (the displacements are ~1e-9 mm)."""
    from cyclereg import api

    r = api.evaluate(_keypoint_dataset(tmp_path, motion=False), tmp_path / "r.json", model="random", device="cpu")
    assert r["initial_tre_mm"] == 0.0 and r["mean_tre_mm"] == pytest.approx(0.0, abs=1e-6)
    assert r["mean_sdlogj"] == pytest.approx(0.0, abs=1e-6) and r["mean_folding_fraction"] == 0.0


def test_evaluate_refuses_or_keeps_sdlogj_when_the_keypoints_lie_outside_the_volume_grid(tmp_path):
    """The same pair moved 1e4 mm along every axis, outside its dataset's volume grid (documented frame: first
    voxel at the origin). TRE is unchanged (checked: 0.0261 mm either way), but SDlogJ is measured on the
    grid where no keypoint is: 5.8e-6 instead of 2.5e-3. ``register --reference`` refuses a fixed cloud with
    no point inside its grid; evaluate should refuse likewise (an InputError) or score the keypoints' region."""
    from cyclereg import api

    inside = api.evaluate(_keypoint_dataset(tmp_path / "a"), tmp_path / "a.json", model="random", device="cpu")
    try:
        far = api.evaluate(_keypoint_dataset(tmp_path / "b", offset=1e4), tmp_path / "b.json", model="random",
                           device="cpu")
    except InputError:
        return
    assert far["mean_tre_mm"] == pytest.approx(inside["mean_tre_mm"], abs=1e-3)
    assert far["mean_sdlogj"] == pytest.approx(inside["mean_sdlogj"], rel=0.2)


def test_evaluate_of_an_identity_volume_pair_reports_dice_1_hd95_0_sdlogj_0(tmp_path, scan):
    """Two copies of one labelled 32^3 scan on an anisotropic, permuted grid, the random model with one warp
    and inverse consistency (an exactly zero field for identical images): Dice 1 and HD95 0 for every label,
    before and after, SDlogJ 0 (to rounding) and no folding."""
    from cyclereg import api

    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    lab = np.zeros((32, 32, 32), np.int16)
    lab[8:20, 10:22, 6:18] = 1
    lab[20:26, 8:14, 16:28] = 2
    img = (scan[8:40, 8:40, 8:40] + 500.0 * lab).astype(np.float32)
    names = [f"T_{n:04d}_0000.nii.gz" for n in (1, 2)]
    for name in names:
        nib.save(nib.Nifti1Image(img, AFFINE), str(tmp_path / "imagesTr" / name))
        nib.save(nib.Nifti1Image(lab, AFFINE), str(tmp_path / "labelsTr" / name))
    (tmp_path / "d.json").write_text(json.dumps({
        "name": "t", "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in names],
        "registration_val": [{"fixed": f"./imagesTr/{names[0]}", "moving": f"./imagesTr/{names[1]}"}]}))
    r = api.evaluate(tmp_path / "d.json", tmp_path / "r.json", model="random", device="cpu", warps=1, adam=False,
                     ic=True)
    pair = r["pairs"][0]
    assert pair["dice_per_label"] == pair["initial_dice_per_label"] == {"1": 1.0, "2": 1.0}
    assert pair["hd95_per_label_mm"] == {"1": 0.0, "2": 0.0} and r["mean_hd95_mm"] == r["initial_hd95_mm"] == 0.0
    assert abs(r["mean_sdlogj"]) < 1e-9 and r["mean_folding_fraction"] == 0.0


# ============================================================================= keypoints of a scan in another unit
def test_foerstner_nms_half_width_of_one_grid_does_not_depend_on_the_header_unit(tmp_path):
    """One grid of 2 x 1.5 x 1.2 mm voxels written with its header in mm, metres and microns: the moving scan's
    3 mm NMS half-width is, by the documented rule (``nms_radius_mm / spacing`` to the nearest voxel, halves
    up), 1.5 -> 2, 2 -> 2, 2.5 -> 3 voxels whatever the unit. The header's float32 stores 1.2 mm as
    1.2000000477 and 0.002 m as 0.0020000001, so 2.5 and 1.5 come out a hair under the half and round down."""
    from cyclereg.keypoints.foerstner import MOVING_NMS_RADIUS_MM, FoerstnerConfig
    from cyclereg.volumeio import read_nifti

    got = {}
    for unit, mm_per_unit in (("mm", 1.0), ("meter", 1e3), ("micron", 1e-3)):
        img = nib.Nifti1Image(np.zeros((10, 10, 10), np.float32), np.diag([2.0 / mm_per_unit, 1.5 / mm_per_unit,
                                                                            1.2 / mm_per_unit, 1.0]))
        img.header.set_xyzt_units(unit)
        nib.save(img, str(tmp_path / f"{unit}.nii.gz"))
        spacing = read_nifti(tmp_path / f"{unit}.nii.gz").spacing
        np.testing.assert_allclose(spacing, [2.0, 1.5, 1.2], rtol=1e-6)
        got[unit] = FoerstnerConfig(nms_radius_mm=MOVING_NMS_RADIUS_MM).nms_radius_voxels(spacing)
    assert got == {"mm": (2, 2, 3), "meter": (2, 2, 3), "micron": (2, 2, 3)}


def test_registration_via_keypoints_is_the_same_with_the_header_in_metres(tmp_path):
    """A smooth pair (moving 4 voxels along j, 2 x 1.5 x 1 mm permuted grid) registered --via-keypoints with
    its headers in mm and in metres (the affine / 1000, xyzt_units meter; read back x1000): the same
    keypoints and the same world-mm field (1e-3 mm: the float32 header's 1e-7 relative rounding). Today the
    moving scan's keypoints differ (148 vs 207) and the field by up to 13 mm."""
    from cyclereg import api

    g = torch.Generator().manual_seed(0)
    big = torch.randn(1, 1, 56, 56, 56, generator=g)
    for _ in range(3):
        big = F.avg_pool3d(F.pad(big, (1,) * 6, mode="replicate"), 3, stride=1)
    big = (big[0, 0].numpy() * 1000.0).astype(np.float32)
    arrays = {"f": big[8:48, 10:50, 8:48], "m": big[8:48, 6:46, 8:48]}
    results = {}
    for unit, scale in (("mm", 1.0), ("meter", 1e-3)):
        affine = AFFINE.copy()
        affine[:3, :] *= scale
        for name, arr in arrays.items():
            img = nib.Nifti1Image(arr, affine)
            img.header.set_xyzt_units(unit)
            nib.save(img, str(tmp_path / f"{unit}_{name}.nii.gz"))
        out = tmp_path / f"out_{unit}"
        api.register(tmp_path / f"{unit}_f.nii.gz", tmp_path / f"{unit}_m.nii.gz", out, via_keypoints=True,
                     disp_mm=True, device="cpu", verbose=False)
        results[unit] = (json.loads((out / "config.json").read_text())["via_keypoints"],
                         np.asarray(nib.load(str(out / "displacement.nii.gz")).dataobj))
    (info_mm, field_mm), (info_m, field_m) = results["mm"], results["meter"]
    assert info_m["moving_points"] == info_mm["moving_points"]
    np.testing.assert_allclose(field_m, field_mm, atol=1e-3, rtol=0)
