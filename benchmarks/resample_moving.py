"""Dense registration of a moving scan stored on another grid (``register --resample-moving``).

The moving scan of a pair (and its label map) is first written on a new grid: isotropic
``--spacing`` mm, rotated by ``--angle`` degrees about the world z axis, covering the scan's
world extent; scipy resamples it there (trilinear / nearest), independently of cyclereg. Then
``register_volume_files(..., resample_moving=True)`` brings it back onto the fixed grid and
registers it. Reported: mean Dice of the warped labels against the fixed labels, next to the
same registration of the original moving scan on the fixed grid (``--baseline``).

    python benchmarks/resample_moving.py ../shared/data/brain-mri --baseline
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from cyclereg.datasets import MAX_VOLUME_VOXELS
from cyclereg.dense.api import register_volume_files
from cyclereg.dense.data import resample_onto
from cyclereg.errors import InputError, finite_number, require_count, require_file, require_output_file
from cyclereg.metrics import dice, scored_labels
from cyclereg.volumeio import read_nifti


def oblique_grid(affine: np.ndarray, shape: tuple[int, int, int], spacing: float, angle_deg: float):
    """Affine and shape of a grid of ``spacing`` mm voxels rotated by ``angle_deg`` about world z
    that covers the world extent of the grid (``affine``, ``shape``)."""
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    lin = rot * spacing
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ corners + affine[:3, 3:4]
    local = np.linalg.solve(lin, world)
    lo, hi = local.min(1), local.max(1)
    new = np.eye(4)
    new[:3, :3] = lin
    new[:3, 3] = lin @ lo
    return new, tuple(int(np.ceil(h - l)) + 1 for l, h in zip(lo, hi))


def regrid(path: Path, out: Path, new_affine: np.ndarray, new_shape, order: int) -> None:
    img = nib.load(str(path))
    arr = np.asarray(img.dataobj, dtype=np.float32 if order else np.int32)
    to_old = np.linalg.solve(img.affine, new_affine)  # new voxel -> old voxel
    coords = np.array(np.meshgrid(*[np.arange(n) for n in new_shape], indexing="ij")).reshape(3, -1)
    old = to_old[:3, :3] @ coords + to_old[:3, 3:4]
    vals = ndimage.map_coordinates(arr, old, order=order, mode="nearest" if order else "constant", cval=0)
    nib.save(nib.Nifti1Image(vals.reshape(new_shape).astype(arr.dtype), new_affine), str(out))


def mean_dice(fixed_labels: Path, labels: Path, moving_labels: Path) -> float:
    """Mean Dice of a label map (brought onto the fixed grid if it lies on another) against the fixed
    labels, over the labels present in the fixed and the unwarped ``moving_labels`` (scored_labels)."""
    fl = read_nifti(fixed_labels, labels=True)
    scored = scored_labels(fl.data, read_nifti(moving_labels, labels=True).data)
    warped = resample_onto(read_nifti(labels, labels=True), fl, labels=True).data
    return float(np.mean(list(dice(fl.data, warped, scored).values())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path, help="Learn2Reg folder with imagesTr/ and labelsTr/ (e.g. brain-mri)")
    ap.add_argument("--fixed", default="0001")
    ap.add_argument("--moving", default="0002")
    ap.add_argument("--spacing", type=float, default=1.5, help="moving grid's voxel size [mm]")
    ap.add_argument("--angle", type=float, default=10.0, help="moving grid's rotation about world z [deg]")
    ap.add_argument("--baseline", action="store_true", help="also register the original moving scan")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    def files(case):
        images = args.data / "imagesTr"
        name = next(images.glob(f"*_{case}_0000.nii.gz"), None)
        if name is None:
            raise InputError(f"no scan *_{case}_0000.nii.gz (a Learn2Reg folder's imagesTr/ holds them)", images)
        return images / name.name, require_file(args.data / "labelsTr" / name.name)

    try:  # bad input: one line before any work
        if not args.data.is_dir():
            raise InputError("no such folder (a Learn2Reg folder with imagesTr/ and labelsTr/ is needed)", args.data)
        if not finite_number(args.spacing) or args.spacing <= 0:
            raise InputError(f"--spacing {args.spacing}: need a finite number of mm > 0")
        if not finite_number(args.angle):
            raise InputError(f"--angle {args.angle}: need a finite number of degrees")
        require_count("--threads", args.threads, 1)
        if args.json is not None:
            require_output_file(args.json)
        fixed, fixed_labels = files(args.fixed)
        moving, moving_labels = files(args.moving)
        src = nib.load(str(moving))
        new_affine, new_shape = oblique_grid(src.affine, src.shape[:3], args.spacing, args.angle)
        if math.prod(new_shape) > MAX_VOLUME_VOXELS:
            raise InputError(f"--spacing {args.spacing}: the moving grid would be {new_shape} voxels, more than "
                             f"{MAX_VOLUME_VOXELS}; give a larger spacing")
    except InputError as exc:
        ap.exit(1, f"error: {exc}\n")
    torch.set_num_threads(args.threads)
    result = {"fixed": str(fixed), "moving": str(moving), "spacing_mm": args.spacing, "angle_deg": args.angle}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        regrid(moving, tmp / "moving.nii.gz", new_affine, new_shape, order=1)
        regrid(moving_labels, tmp / "moving_labels.nii.gz", new_affine, new_shape, order=0)
        result["moving_grid"] = {"shape": list(new_shape), "affine": new_affine.tolist()}
        runs = [("regridded", tmp / "moving.nii.gz", tmp / "moving_labels.nii.gz")]
        if args.baseline:
            runs.insert(0, ("original", moving, moving_labels))
        for name, mv, ml in runs:
            t0 = time.perf_counter()
            register_volume_files(fixed, mv, tmp / name, moving_labels=ml, device="cpu", resample_moving=True)
            seconds = time.perf_counter() - t0
            result[name] = {"initial_dice": mean_dice(fixed_labels, ml, ml),
                            "dice": mean_dice(fixed_labels, tmp / name / "warped_labels.nii.gz", ml), "seconds": seconds}
            print(f"{name}: moving grid {read_nifti(mv).shape}, mean Dice {result[name]['initial_dice']:.3f} -> "
                  f"{result[name]['dice']:.3f}, {seconds:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
