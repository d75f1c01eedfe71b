"""End to end: from two CT volumes to a keypoint-cloud registration, against a known field.

1. The moving scan is the chest CT deformed by a known smooth random field ``u`` in the
   package's convention (fixed -> moving): fixed point ``p`` corresponds to moving point
   ``p + u(p)``, i.e. ``moving(p + u(p)) = fixed(p)``. The moving image is therefore made
   by sampling the fixed image at ``q + v(q)`` with ``v`` the inverse displacement
   (``v(q) = -u(q + v(q))``, fixed-point iteration); a tiny self-check verifies the sign.
2. Foerstner keypoints with automatic lung masks in both scans (``cyclereg keypoints``).
3. Keypoint-cloud registration (random features, or ``--model CKPT``), densified on the fixed CT's grid and
   the moving CT warped onto it (``cyclereg register FIXED.csv MOVING.csv -o OUT --model random
   --reference FIXED.nii.gz --moving-image MOVING.nii.gz --jacobian``).
4. Mean error at the fixed keypoints: before ``|u|`` and after ``|u_pred - u|`` (mm); the same
   for the dense field over every voxel of the fixed lung mask; and the mean absolute intensity
   difference (HU) inside that mask between the fixed CT and the moving CT, before and after warping;
   and the Jacobian determinant map of the registered field against that of the known field in the
   lung mask (mean absolute difference, Pearson correlation).

Run from the repository root::

    python examples/chest_ct_end_to_end.py --out runs/chest_e2e

Writes ``OUT/moving.nii.gz``, ``OUT/{fixed,moving}_keypoints.csv`` (+ ``.config.json``),
``OUT/fixed_lung_mask.nii.gz``, ``OUT/registration/`` (with ``displacement.nii.gz``,
``warped.nii.gz`` and ``jacobian.nii.gz``) and ``OUT/e2e_result.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from cyclereg.device import resolve_device
from cyclereg.errors import (InputError, finite_number, refuse_output_in_run, require_checkpoint_file,
                             require_output_dir, require_seed)
from cyclereg.frames import ALIGN_CORNERS, mm_disp_to_voxel, voxel_disp_to_mm
from cyclereg.keypoints.api import detect_keypoints_file
from cyclereg.metrics import jacobian_map
from cyclereg.pointio import read_points
from cyclereg.volumeio import read_nifti, write_nifti
from cyclereg.warp import sample_at_points, warp

DEFAULT_CT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chest-ct" / "chest_ct.nii.gz"


@dataclass(frozen=True)
class FieldConfig:
    """The known random deformation.

    Attributes:
        rms_mm: root-mean-square magnitude of ``u`` over the volume [mm].
        smoothness_mm: standard deviation [mm] of the Gaussian that smooths white noise
            into the field (larger: smoother, more lung-motion-like).
        field_spacing_mm: the field lives on a grid of about this spacing [mm] and is
            upsampled trilinearly (it is smooth at this scale).
        inverse_iterations: fixed-point iterations for the inverse displacement.
        seed: random seed.
    """

    rms_mm: float = 8.0
    smoothness_mm: float = 25.0
    field_spacing_mm: float = 4.0
    inverse_iterations: int = 20
    seed: int = 0


# ----------------------------------------------------------------------------- the known field
def coarse_shape(shape, spacing_mm, field_spacing_mm: float) -> tuple[int, int, int]:
    """A grid spanning the same voxel centres (first and last aligned) at about ``field_spacing_mm``."""
    return tuple(max(2, int(round((n - 1) * s / field_spacing_mm)) + 1) for n, s in zip(shape, spacing_mm))  # type: ignore[return-value]


def random_field(shape, affine: np.ndarray, cfg: FieldConfig) -> tuple[torch.Tensor, tuple[float, float, float]]:
    """Smooth random ``u`` on a coarse grid: ``(1, 3, Dc, Hc, Wc)`` in voxels of the *fixed*
    grid, and the coarse-to-fine index factors per axis (fine index = coarse index * factor)."""
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    cshape = coarse_shape(shape, spacing, cfg.field_spacing_mm)
    factor = tuple((n - 1) / (c - 1) for n, c in zip(shape, cshape))
    cspacing = spacing * np.asarray(factor)
    rng = np.random.default_rng(cfg.seed)
    comps = [ndi.gaussian_filter(rng.standard_normal(cshape), cfg.smoothness_mm / cspacing, mode="reflect")
             for _ in range(3)]
    u_mm = torch.from_numpy(np.stack(comps)[None]).double()  # world (x, y, z) components
    u_mm *= cfg.rms_mm / u_mm.norm(dim=1).pow(2).mean().sqrt()
    return mm_disp_to_voxel(u_mm, torch.from_numpy(affine)).float(), factor  # type: ignore[return-value]


def to_coarse_units(disp_fine_vox: torch.Tensor, factor) -> torch.Tensor:
    """A displacement in fine voxels -> coarse-grid voxels (per axis)."""
    return disp_fine_vox / torch.tensor(factor, dtype=disp_fine_vox.dtype).view(1, 3, 1, 1, 1)


def inverse_field(u_coarse_vox: torch.Tensor, iterations: int) -> torch.Tensor:
    """``v`` with ``v(q) = -u(q + v(q))`` on the same grid (both in that grid's voxels)."""
    v = -u_coarse_vox
    for _ in range(iterations):
        v = -warp(u_coarse_vox, v, padding_mode="border")
    return v


def deform(fixed: torch.Tensor, u_fine_vox_coarse: torch.Tensor, factor,
           iterations: int) -> tuple[torch.Tensor, float]:
    """Moving image ``(D, H, W)`` with ``moving(p + u(p)) = fixed(p)``, and the largest
    inversion residual ``|v(q) + u(q + v(q))|`` on the coarse grid [fine voxels].

    ``u_fine_vox_coarse``: ``(1, 3, Dc, Hc, Wc)`` displacement in fine voxels on the coarse grid.
    """
    u = to_coarse_units(u_fine_vox_coarse, factor)
    v_coarse = inverse_field(u, iterations)
    scale = torch.tensor(factor, dtype=u.dtype).view(1, 3, 1, 1, 1)
    residual = float(((v_coarse + warp(u, v_coarse)) * scale).norm(dim=1).max())
    v_fine = F.interpolate(v_coarse * scale, size=tuple(fixed.shape), mode="trilinear", align_corners=ALIGN_CORNERS)
    return warp(fixed[None, None], v_fine)[0, 0], residual


def u_at(u_fine_vox_coarse: torch.Tensor, factor, points_vox: torch.Tensor) -> torch.Tensor:
    """``u`` in fine voxels ``(N, 3)`` at fine voxel points ``(N, 3)``."""
    return sample_at_points(u_fine_vox_coarse, points_vox / torch.tensor(factor, dtype=points_vox.dtype))


def u_mm_at(u_fine_vox_coarse: torch.Tensor, factor, points_vox: torch.Tensor, affine: torch.Tensor) -> np.ndarray:
    """The known ``u`` in world mm ``(N, 3)`` at fine voxel points ``(N, 3)`` of the grid ``affine``."""
    u_vox = u_at(u_fine_vox_coarse.double(), factor, points_vox)
    return voxel_disp_to_mm(u_vox.T.reshape(1, 3, -1, 1, 1), affine).reshape(3, -1).T.numpy()


def sign_self_check() -> None:
    """A bright voxel at ``p`` must land at ``p + u`` in the moving image (constant ``u``)."""
    shape, p, shift = (16, 16, 16), (5, 6, 7), (3.0, 2.0, -2.0)
    fixed = torch.zeros(shape)
    fixed[p] = 1.0
    u = torch.tensor(shift).view(1, 3, 1, 1, 1).expand(1, 3, 4, 4, 4).contiguous()
    factor = tuple((n - 1) / 3 for n in shape)
    moving, _ = deform(fixed, u, factor, iterations=5)
    found = np.unravel_index(int(moving.argmax()), shape)
    expected = tuple(int(a + b) for a, b in zip(p, shift))
    if tuple(int(v) for v in found) != expected:
        raise AssertionError(f"sign check failed: bright voxel at {found}, expected p + u = {expected}")


# ----------------------------------------------------------------------------- pipeline
def run(ct: Path, out: Path, cfg: FieldConfig, *, moving_nms_radius_mm: float, device: str,
        model: str = "random") -> dict:
    sign_self_check()
    timings = {}
    t = time.perf_counter()
    fixed = read_nifti(ct)  # read and checked before the output folder is made
    require_output_dir(out)  # a file there, or a run directory's folder: one line before any work
    refuse_output_in_run(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    u_c, factor = random_field(fixed.shape, fixed.affine, cfg)
    moving, residual_vox = deform(fixed.data, u_c, factor, cfg.inverse_iterations)
    moving_path = out / "moving.nii.gz"
    write_nifti(moving_path, moving, fixed.affine)
    timings["deform_s"] = time.perf_counter() - t

    t = time.perf_counter()
    fixed_kp = out / "fixed_keypoints.csv"
    moving_kp = out / "moving_keypoints.csv"
    mask_path = out / "fixed_lung_mask.nii.gz"
    kf = detect_keypoints_file(ct, fixed_kp, lung_mask=True, save_mask=mask_path, device=device)
    km = detect_keypoints_file(moving_path, moving_kp, lung_mask=True, nms_radius_mm=moving_nms_radius_mm,
                               device=device)
    timings["keypoints_s"] = time.perf_counter() - t

    t = time.perf_counter()
    reg_dir = out / "registration"
    cmd = [sys.executable, "-m", "cyclereg_cli.main", "register", str(fixed_kp), str(moving_kp),
           "-o", str(reg_dir), "--model", model, "--device", device,
           "--reference", str(ct), "--moving-image", str(moving_path), "--jacobian"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    timings["register_s"] = time.perf_counter() - t

    table = np.loadtxt(reg_dir / "displacements.csv", delimiter=",", skiprows=1)
    pts_mm, pred_mm = table[:, :3], table[:, 3:6]
    fixed_mm = read_points(fixed_kp).double().numpy()
    if pts_mm.shape != fixed_mm.shape or np.abs(pts_mm - fixed_mm).max() > 1e-3:
        raise RuntimeError("displacements.csv rows do not match the fixed keypoints")
    affine = torch.from_numpy(fixed.affine)
    u_mm = u_mm_at(u_c, factor, kf.voxels.double(), affine)
    err_before = np.linalg.norm(u_mm, axis=1)
    err_after = np.linalg.norm(pred_mm - u_mm, axis=1)

    # the dense field and the warped scan over the fixed lung mask
    lung = read_nifti(mask_path, labels=True).data > 0
    lung_vox = torch.nonzero(lung).double()
    field = torch.from_numpy(np.asarray(nib.load(str(reg_dir / "displacement.nii.gz")).dataobj))  # (D, H, W, 3) voxels
    pred_dense = field[lung].double() @ affine[:3, :3].T
    true_dense = u_at(u_c.double(), factor, lung_vox) @ affine[:3, :3].T
    dense_before = true_dense.norm(dim=1).numpy()
    dense_after = (pred_dense - true_dense).norm(dim=1).numpy()
    # the Jacobian determinant map (local volume ratio) against that of the known field
    u_full = F.interpolate(u_c, size=tuple(fixed.shape), mode="trilinear", align_corners=ALIGN_CORNERS)
    jac_true = jacobian_map(u_full)[lung].double()
    del u_full
    jac_pred = read_nifti(reg_dir / "jacobian.nii.gz").data[lung].double()
    jac_corr = float(torch.corrcoef(torch.stack([jac_pred, jac_true]))[0, 1])
    warped = read_nifti(reg_dir / "warped.nii.gz").data
    hu_before = float((fixed.data - moving).abs()[lung].mean())
    hu_after = float((fixed.data - warped).abs()[lung].mean())
    result = {
        "ct": str(ct),
        "model": model,
        "field": asdict(cfg),
        "inverse_residual_max_voxels": residual_vox,
        "fixed_keypoints": int(kf.voxels.shape[0]),
        "moving_keypoints": int(km.voxels.shape[0]),
        "moving_nms_radius_mm": moving_nms_radius_mm,
        "error_before_mm": {"mean": float(err_before.mean()), "median": float(np.median(err_before)),
                            "p90": float(np.percentile(err_before, 90))},
        "error_after_mm": {"mean": float(err_after.mean()), "median": float(np.median(err_after)),
                           "p90": float(np.percentile(err_after, 90))},
        "lung_voxels": int(lung.sum()),
        "dense_error_before_mm": {"mean": float(dense_before.mean()), "p90": float(np.percentile(dense_before, 90))},
        "dense_error_after_mm": {"mean": float(dense_after.mean()), "p90": float(np.percentile(dense_after, 90))},
        "lung_mean_abs_hu_difference": {"before": hu_before, "after": hu_after},
        "lung_jacobian": {"true_mean": float(jac_true.mean()), "true_std": float(jac_true.std()),
                          "predicted_mean": float(jac_pred.mean()), "predicted_std": float(jac_pred.std()),
                          "mean_abs_error": float((jac_pred - jac_true).abs().mean()), "pearson": jac_corr},
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }
    (out / "e2e_result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ct", type=Path, default=DEFAULT_CT, help="fixed CT (NIfTI, HU)")
    ap.add_argument("--out", type=Path, default=Path("runs/chest_e2e"), help="output folder")
    ap.add_argument("--rms-mm", type=float, default=FieldConfig.rms_mm, help="RMS magnitude of the known field [mm]")
    ap.add_argument("--smoothness-mm", type=float, default=FieldConfig.smoothness_mm, help="field smoothness [mm]")
    ap.add_argument("--seed", type=int, default=FieldConfig.seed, help="seed of the known random field")
    ap.add_argument("--moving-nms-radius", type=float, default=3.0,
                    help="NMS radius [mm] in the moving scan (denser moving cloud, as in the paper)")
    ap.add_argument("--device", default="cpu", help="auto, cpu or cuda (for `cyclereg keypoints` and `register`)")
    ap.add_argument("--model", default="random", help="checkpoint for `cyclereg register`, or 'random'")
    a = ap.parse_args(argv)
    cfg = FieldConfig(rms_mm=a.rms_mm, smoothness_mm=a.smoothness_mm, seed=a.seed)
    try:  # options first: a bad value is one line before the CT is deformed
        for flag, value in (("--rms-mm", a.rms_mm), ("--smoothness-mm", a.smoothness_mm),
                            ("--moving-nms-radius", a.moving_nms_radius)):
            if not finite_number(value) or value < 0:
                raise InputError(f"{flag} {value}: need a finite number of mm >= 0")
        require_seed(a.seed)
        resolve_device(a.device)
        if a.model != "random":  # read by `cyclereg register` after the deformation and the keypoints
            require_checkpoint_file(a.model)
        res = run(a.ct, a.out, cfg, moving_nms_radius_mm=a.moving_nms_radius, device=a.device, model=a.model)
    except InputError as exc:  # a missing or unreadable CT, an option out of range: one line
        ap.exit(1, f"error: {exc}\n")
    b, e = res["error_before_mm"], res["error_after_mm"]
    print(f"fixed {res['fixed_keypoints']} / moving {res['moving_keypoints']} keypoints; "
          f"mean error before {b['mean']:.2f} mm (median {b['median']:.2f}), "
          f"after {e['mean']:.2f} mm (median {e['median']:.2f})")
    db, da, hu = res["dense_error_before_mm"], res["dense_error_after_mm"], res["lung_mean_abs_hu_difference"]
    print(f"dense field over {res['lung_voxels']} lung voxels: mean error before {db['mean']:.2f} mm, after "
          f"{da['mean']:.2f} mm; mean |fixed - moving| in the lungs {hu['before']:.1f} HU -> {hu['after']:.1f} HU warped")
    j = res["lung_jacobian"]
    print(f"Jacobian determinant in the lungs: known field {j['true_mean']:.3f} +- {j['true_std']:.3f}, "
          f"jacobian.nii.gz {j['predicted_mean']:.3f} +- {j['predicted_std']:.3f}; mean |difference| "
          f"{j['mean_abs_error']:.3f}, Pearson {j['pearson']:.2f}")


if __name__ == "__main__":
    main()
