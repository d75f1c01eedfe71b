"""Write a coarser copy of a Learn2Reg volume dataset, for CPU-sized experiments.

``python benchmarks/downsample_l2r.py DATASET_JSON OUT [--factor 2] [--training-images N]``

Every image and label map listed in the dataset JSON is reduced by an integer ``--factor`` per
axis: images by the mean of each ``f x f x f`` block (CT stays in HU, rounded to the input's
integer type), label maps by the majority label of the block (ties to the smaller label value).
The affine keeps the world frame: the new voxel ``i'`` has its centre at the centre of the block
it summarises, i.e. old voxel coordinates ``f i' + (f - 1) / 2``. Axes not divisible by the factor
lose their last ``shape % f`` voxels (the affine is unaffected). The JSON is copied with the same
relative paths; ``--training-images N`` keeps, of the images that are in no ``registration_val``
pair (the training scans of :func:`cyclereg.dense.data.training_images`), only the first ``N``
(``N (N - 1) / 2`` training pairs), and all validation scans. Reads no more than the files the JSON
names; labels are copied for evaluation only (training never reads them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from cyclereg.datasets import read_json
from cyclereg.errors import InputError, require_count, require_output_dir


def block_mean(x: np.ndarray, f: int) -> np.ndarray:
    """Mean of every ``f x f x f`` block of ``x`` ``(X, Y, Z)``: ``(X // f, Y // f, Z // f)``."""
    s = [n // f for n in x.shape]
    x = x[: s[0] * f, : s[1] * f, : s[2] * f].astype(np.float64)
    return x.reshape(s[0], f, s[1], f, s[2], f).mean(axis=(1, 3, 5))


def block_majority(labels: np.ndarray, f: int) -> np.ndarray:
    """Most frequent label of every ``f x f x f`` block (ties: the smaller label value)."""
    values = np.unique(labels)
    counts = np.stack([block_mean(labels == v, f) for v in values])  # (L, X', Y', Z')
    return values[np.argmax(counts, axis=0)].astype(labels.dtype)


def coarser_affine(affine: np.ndarray, f: int) -> np.ndarray:
    """Voxel -> world affine of the ``f``-times coarser grid whose voxels are the blocks' centres."""
    scale = np.diag([f, f, f, 1.0])
    scale[:3, 3] = (f - 1) / 2.0
    return affine @ scale


def downsample_file(src: Path, dst: Path, f: int, is_label: bool) -> None:
    img = nib.load(str(src))
    data = np.asanyarray(img.dataobj)
    if is_label:
        out = block_majority(data, f)
    else:
        out = block_mean(data, f)
        if np.issubdtype(data.dtype, np.integer):
            out = np.rint(out).astype(data.dtype)
        else:
            out = out.astype(data.dtype)
    header = img.header.copy()
    header.set_data_dtype(out.dtype)
    dst.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(out, coarser_affine(img.affine, f), header), str(dst))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--factor", type=int, default=2, help="integer reduction per axis (default 2)")
    ap.add_argument("--training-images", type=int, default=None,
                    help="keep only the first N images that are in no registration_val pair")
    args = ap.parse_args(argv)
    try:  # bad input: one line before any file is written
        require_count("--factor", args.factor, 1)
        require_count("--training-images", args.training_images, 0)
        require_output_dir(args.out)
        spec = read_json(args.dataset)
        if not isinstance(spec.get("training"), list):
            raise InputError("no 'training' list of image entries (a Learn2Reg dataset JSON has one)", args.dataset)
    except InputError as exc:
        ap.exit(1, f"error: {exc}\n")
    root = args.dataset.parent
    val_images = {p[k] for p in spec.get("registration_val", []) for k in ("fixed", "moving")}
    training = spec["training"]
    if args.training_images is not None:
        kept, held_out = [], 0
        for entry in training:
            if entry["image"] in val_images:
                kept.append(entry)
            elif held_out < args.training_images:
                kept.append(entry)
                held_out += 1
        training = kept
    spec = dict(spec, training=training, numTraining=len(training))
    spec["downsampled"] = {"source": str(args.dataset), "factor": args.factor,
                           "training_images": args.training_images}
    for entry in training:
        for key, is_label in (("image", False), ("label", True)):
            if key in entry:
                downsample_file(root / entry[key], args.out / entry[key], args.factor, is_label)
                print(args.out / entry[key])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / args.dataset.name).write_text(json.dumps(spec, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
