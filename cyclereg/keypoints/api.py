"""Keypoint detection entry points: in-memory (:func:`detect_keypoints`), file to file
(:func:`detect_keypoints_file`, behind ``cyclereg keypoints``) and scan pairs to a keypoint
dataset (:func:`build_keypoint_dataset`, behind ``cyclereg keypoints --pairs``).

Output files
------------
``OUTPUT``
    ``csv``: header ``x_mm,y_mm,z_mm``, world millimetres from the NIfTI affine;
    ``l2r``: headerless Learn2Reg CSV of voxel indices ``(i, j, k)``;
    ``ply`` / ``pcd``: open3d point cloud in world mm; ``npy``: ``(N, 3)`` float32 mm.
    By default the format ``OUTPUT``'s suffix names (``csv`` for ``.csv``, ``.txt`` and others).
    Rows are sorted by decreasing distinctiveness.
``OUTPUT.config.json``
    The resolved configuration (detector and lung-mask parameters, inputs, device), the
    volume geometry, the number of keypoints and the timings.
``--save-mask PATH``
    The automatic lung mask (uint8 NIfTI with the CT's affine).

Nothing is written when the input is bad (missing file, not 3-D, empty mask, no keypoint):
an :class:`~cyclereg.errors.InputError` is raised first.

``--pairs PAIRS.csv`` (:func:`build_keypoint_dataset`) writes, into the output directory,
``keypoints/{id}_fixed.csv`` and ``keypoints/{id}_moving.csv`` for every pair of the CSV,
``dataset.json`` (a keypoint dataset, see :mod:`cyclereg.datasets`) and
``dataset.json.config.json``.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.markup import escape
from rich.progress import Progress

from cyclereg.checkpoint import atomic_write_text, staged_file_set, write_json
from cyclereg.console import Steps, count, make_console
from cyclereg.device import provenance, resolve_device
from cyclereg.datasets import require_case_distinct_ids, require_pair_ids
from cyclereg.errors import (InputError, refuse_output_in_run, require_file, require_output_dir, require_output_file,
                             require_separate_output, whole_number)
from cyclereg.frames import voxel_to_world
from cyclereg.keypoints.foerstner import FoerstnerConfig, PairKeypointConfig, foerstner_keypoints
from cyclereg.keypoints.lungmask import LungMaskConfig, lung_mask as compute_lung_mask
from cyclereg.pointio import (holds_voxel_indices, points_csv, read_landmark_pair, read_points, require_open3d,
                              write_points)
from cyclereg.volumeio import Volume, read_nifti, same_grid, write_nifti

FORMATS = ("csv", "l2r", "ply", "pcd", "npy")
SUFFIX_FORMATS = {".csv": ("csv", "l2r"), ".txt": ("csv", "l2r"), ".npy": ("npy",), ".ply": ("ply",), ".pcd": ("pcd",)}
"""The formats a keypoint file of each suffix can hold (the first: the default for that suffix)."""


def output_format(output: str | Path, fmt: str | None) -> str:
    """The format to write ``output`` in: ``fmt`` (checked against the suffix) or the suffix's. A
    suffix no reader of this package knows is refused: the file could not be read back."""
    suffix = Path(output).suffix.lower()
    allowed = SUFFIX_FORMATS.get(suffix)
    if fmt is not None and (not isinstance(fmt, str) or fmt.lower() not in FORMATS):
        raise InputError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if allowed is None:
        raise InputError(f"unknown suffix '{suffix or '(none)'}' for a keypoint file: name it "
                         f"{', '.join(SUFFIX_FORMATS)} (the format follows the suffix; --format l2r for a .csv/.txt "
                         "of Learn2Reg voxel indices)", output)
    if fmt is None:
        return allowed[0]
    fmt = fmt.lower()
    if fmt not in allowed:
        raise InputError(f"--format {fmt} into a '{suffix}' file: that suffix holds {' or '.join(allowed)}; "
                         "name the file for its format", output)
    return fmt


CONFIG_SUFFIX = ".config.json"
"""The resolved configuration is written to ``str(output) + CONFIG_SUFFIX``."""


def config_path_for(output: str | Path) -> Path:
    """Where :func:`detect_keypoints_file` writes the resolved configuration of ``output``."""
    return Path(str(output) + CONFIG_SUFFIX)


@dataclass(frozen=True)
class KeypointResult:
    """Keypoints of one volume.

    Attributes:
        points_mm: ``(N, 3)`` float64 world mm (x, y, z), strongest first.
        voxels: ``(N, 3)`` int64 voxel indices (i, j, k).
        scores: ``(N,)`` float32 Foerstner distinctiveness.
        mask: ``(D, H, W)`` bool numpy mask the keypoints were restricted to (None: none).
        candidates: local maxima above the threshold before ``max_points``.
        timings_s: seconds per step.
    """

    points_mm: torch.Tensor
    voxels: torch.Tensor
    scores: torch.Tensor
    mask: np.ndarray | None
    candidates: int
    timings_s: dict


def detect_keypoints(volume: Volume, *, mask: np.ndarray | torch.Tensor | None = None, lung_mask: bool = False,
                     config: FoerstnerConfig = FoerstnerConfig(), lung_config: LungMaskConfig = LungMaskConfig(),
                     device: str | torch.device = "auto", verbose: bool = False,
                     mask_source: str | Path | None = None, label: str = "") -> KeypointResult:
    """Foerstner keypoints of a volume, restricted to ``mask`` or to an automatic lung mask.

    Args:
        volume: the CT (HU when ``lung_mask``); spacing and affine are taken from it.
        mask: ``(D, H, W)`` bool/0-1 mask, or None.
        lung_mask: compute the mask with :func:`cyclereg.keypoints.lungmask.lung_mask`
            (exclusive with ``mask``).
        config, lung_config: detector and lung-mask parameters.
        device: where the detector runs (``auto``/``cpu``/``cuda``); the lung mask is
            computed on the CPU (scipy).
        mask_source: file the mask came from, named in errors about the mask.
        label: prefix of the step names shown with ``verbose`` (e.g. ``"fixed scan: "``).
    Raises:
        InputError: empty mask, mask of another shape, or no keypoint found.
    """
    if mask is not None and lung_mask:
        raise InputError("give either a mask or lung_mask, not both")
    dev = resolve_device(device)
    steps = Steps(verbose)
    where = volume.path
    mask_where = mask_source if mask_source is not None else where
    if lung_mask:
        with steps(f"{label}lung mask"):
            mask = compute_lung_mask(volume.data.numpy(), volume.affine, lung_config)
        if not mask.any():
            raise InputError("the automatic lung mask is empty (is this a chest CT in HU?)", where)
    elif mask is not None:
        mask = torch.as_tensor(mask).cpu().numpy().astype(bool)
        if mask.shape != volume.shape:
            raise InputError(f"mask shape {mask.shape} differs from the volume shape {volume.shape}", mask_where)
        if not mask.any():
            raise InputError("the mask is empty", mask_where)
    with steps(f"{label}Foerstner keypoints ({dev.type})"):
        try:
            kp = foerstner_keypoints(volume.data.to(dev), volume.spacing,
                                     None if mask is None else torch.from_numpy(mask).to(dev), config)
        except ValueError as exc:
            raise InputError(str(exc), mask_where if "mask" in str(exc) else where) from None
    if kp.voxels.shape[0] == 0:
        raise InputError("no keypoint found (a flat image? lower the detector threshold or check the mask)", where)
    points_mm = voxel_to_world(kp.voxels.double(), torch.from_numpy(volume.affine))
    return KeypointResult(points_mm=points_mm, voxels=kp.voxels, scores=kp.scores, mask=mask,
                          candidates=kp.candidates, timings_s=steps.timings)


OPTION_FLAGS = {"sigma_mm": "--sigma", "nms_radius_mm": "--nms-radius", "threshold": "--threshold",
                "max_points": "--max-points"}
"""The command-line option of each :class:`FoerstnerConfig` field ``keypoints`` sets (for messages)."""


def foerstner_config(base: FoerstnerConfig = FoerstnerConfig(), *, sigma_mm: float | None = None,
                     nms_radius_mm: float | None = None, threshold: float | None = None,
                     max_points: int | None = None, flags: dict[str, str] | None = None) -> FoerstnerConfig:
    """``base`` with the given command-line values (``None``: keep; ``max_points=0``: no limit);
    an invalid value is an :class:`InputError` naming its option (``flags`` overrides
    :data:`OPTION_FLAGS`)."""
    overrides = {k: v for k, v in dict(sigma_mm=sigma_mm, nms_radius_mm=nms_radius_mm, threshold=threshold).items()
                 if v is not None}
    if max_points is not None:
        flag = {**OPTION_FLAGS, **(flags or {})}["max_points"]
        if not whole_number(max_points) or max_points < 0:
            raise InputError(f"{flag} must be a whole number >= 0 (0: no limit), got {max_points!r}")
        overrides["max_points"] = None if max_points == 0 else max_points
    try:
        return dataclasses.replace(base, **overrides)
    except ValueError as exc:
        message = str(exc)
        for field, flag in {**OPTION_FLAGS, **(flags or {})}.items():
            if message.startswith(field + " "):
                message = flag + message[len(field):]
        raise InputError(message) from None


def pair_keypoint_config(*, sigma_mm: float | None = None, nms_radius_mm: float | None = None,
                         moving_nms_radius_mm: float | None = None, threshold: float | None = None,
                         max_points: int | None = None) -> PairKeypointConfig:
    """:class:`PairKeypointConfig` with the given command-line values: ``nms_radius_mm`` for the
    fixed scans, ``moving_nms_radius_mm`` for the moving ones, the rest for both."""
    shared = dict(sigma_mm=sigma_mm, threshold=threshold, max_points=max_points)
    default = PairKeypointConfig()
    return PairKeypointConfig(fixed=foerstner_config(default.fixed, nms_radius_mm=nms_radius_mm, **shared),
                              moving=foerstner_config(default.moving, nms_radius_mm=moving_nms_radius_mm, **shared,
                                                      flags={"nms_radius_mm": "--moving-nms-radius"}))


def detect_keypoints_file(ct: str | Path, output: str | Path, *, mask: str | Path | None = None,
                          lung_mask: bool = False, save_mask: str | Path | None = None,
                          sigma_mm: float | None = None, nms_radius_mm: float | None = None,
                          threshold: float | None = None, max_points: int | None = None,
                          fmt: str | None = None, device: str = "auto", verbose: bool = True) -> KeypointResult:
    """Read ``ct``, detect keypoints and write them to ``output`` (see the module doc).

    ``None`` options take the defaults of :class:`FoerstnerConfig`; ``max_points=0`` keeps
    every keypoint. ``fmt``: one of :data:`FORMATS`, by default the one ``output``'s suffix names;
    a format its suffix contradicts (``npy`` into ``k.csv``) or a suffix no reader knows is refused.
    Raises :class:`InputError` (nothing written) for bad input.
    """
    require_output_file(output)
    require_output_file(config_path_for(output))  # written after the points: a folder there would stop it midway
    require_separate_output(output, "-o", files={"the CT": ct, "--mask": mask})
    fmt = output_format(output, fmt)
    if save_mask is not None:
        require_output_file(save_mask)
        require_separate_output(save_mask, "--save-mask",
                                files={"the keypoint output (-o)": output, "its configuration": config_path_for(output),
                                       "the CT": ct, "--mask": mask})
        if not str(save_mask).lower().endswith((".nii", ".nii.gz")):
            raise InputError("--save-mask: the mask is written as NIfTI; give a .nii or .nii.gz file name", save_mask)
    if mask is not None and lung_mask:
        raise InputError("give either --mask or --lung-mask, not both")
    if save_mask is not None and not lung_mask:
        raise InputError("--save-mask needs --lung-mask")
    config = foerstner_config(sigma_mm=sigma_mm, nms_radius_mm=nms_radius_mm, threshold=threshold,
                              max_points=max_points)
    lung_config = LungMaskConfig()
    if fmt in ("ply", "pcd"):
        require_open3d()
    dev = resolve_device(device)

    steps = Steps(verbose)
    t0 = time.perf_counter()
    with steps("read CT"):
        volume = read_nifti(ct)
    mask_array = None
    if mask is not None:
        with steps("read mask"):
            mvol = read_nifti(mask, labels=True)
        if mvol.shape != volume.shape:
            raise InputError(f"mask shape {mvol.shape} differs from the CT shape {volume.shape}", mask)
        if not same_grid(mvol, volume):
            raise InputError(f"mask lies on another grid than the CT {volume.path} (same shape, different "
                             "voxel-to-world affine: spacing, origin or orientation); resample it onto the CT's grid",
                             mask)
        mask_array = mvol.data.numpy() > 0
        if not mask_array.any():
            raise InputError("the mask is empty", mask)
    result = detect_keypoints(volume, mask=mask_array, lung_mask=lung_mask, config=config,
                              lung_config=lung_config, device=dev, verbose=verbose, mask_source=mask)
    timings = {**steps.timings, **result.timings_s}

    with steps("write"), staged_file_set() as files:  # the points, their configuration and the mask: a set
        if save_mask is not None:
            write_nifti(files(save_mask), result.mask.astype(np.uint8), volume.affine)
        # l2r: back to this scan's indices
        write_points(files(output), result.points_mm, fmt=fmt, affine=volume.affine)
        timings["total"] = round(time.perf_counter() - t0, 3)
        write_json(files(config_path_for(output)), {
            **provenance(dev),
            "command": "keypoints",
            "ct": str(ct),
            "output": str(output),
            "format": fmt,
            "units": "voxel indices (i, j, k)" if fmt == "l2r" else "world mm (x, y, z) from the NIfTI affine",
            "mask": None if mask is None else str(mask),
            "lung_mask": lung_mask,
            "save_mask": None if save_mask is None else str(save_mask),
            "device": str(dev),
            "foerstner": dataclasses.asdict(config),
            "nms_radius_voxels": list(config.nms_radius_voxels(volume.spacing)),  # the mm radius on this grid
            "lung_mask_config": dataclasses.asdict(lung_config) if lung_mask else None,
            "volume": {"shape": list(volume.shape), "spacing_mm": list(volume.spacing),
                       "affine": volume.affine.tolist()},  # voxel (i, j, k) -> world mm: places l2r indices
            "mask_voxels": None if result.mask is None else int(result.mask.sum()),
            "num_keypoints": int(result.voxels.shape[0]),
            "num_candidates": result.candidates,
            "timings_s": timings,
        })
    if verbose:  # the result line, on stdout
        kept = int(result.voxels.shape[0])
        # a cut by --max-points is said where it happens (703,661 candidates of a chest CT at small radii -> 3000)
        cut = (f"; the strongest of {result.candidates:,} candidates, --max-points {config.max_points}"
               if result.candidates > kept else "")
        make_console().print(f"{count(kept, 'keypoint')} -> {escape(str(output))} "
                            f"[dim](total {timings['total']:.2f} s{cut})[/dim]", soft_wrap=True)
    return result


INDEX_CHECK_SPACING = (1.0, 1.0, 1.0)
"""The spacing [mm] with which voxel-index landmark files are read to check their counts and numbers
before detection (their mm positions come later, from each scan's affine)."""


def _require_indices_inside(index: torch.Tensor, ct: Path, landmarks: Path) -> None:
    """:class:`InputError` naming ``landmarks`` when one of its voxel indices ``(N, 3)`` (read with
    :data:`INDEX_CHECK_SPACING`, so index = value) lies outside the voxels of the scan ``ct``: indices of
    another scan, or in another axis order. Reads ``ct``'s header only; an unreadable scan is left to
    its reader."""
    import nibabel as nib  # noqa: PLC0415

    try:
        shape = tuple(int(n) for n in nib.load(str(ct)).shape[:3])
    except Exception:  # noqa: BLE001 - read_nifti names the problem when the scan is read
        return
    if len(shape) != 3:
        return
    upper = torch.tensor(shape, dtype=index.dtype) - 0.5  # the far edge of the last voxel
    outside = ((index < -0.5) | (index > upper)).any(dim=1)
    if bool(outside.any()):
        r = int(outside.nonzero()[0, 0])
        at = ", ".join(f"{float(v):g}" for v in index[r])
        raise InputError(f"landmark {r} at voxel index ({at}) lies outside the scan {ct} of shape {shape} "
                         f"({int(outside.sum())} of {index.shape[0]} landmarks do): indices of another scan, or "
                         "in another axis order?", landmarks)


PAIRS_COLUMNS = ("id", "fixed", "moving")
"""Required columns of a pairs CSV (:func:`build_keypoint_dataset`); ``fixed_landmarks`` and
``moving_landmarks`` may follow (both or neither, per row)."""


PAIR_ID = re.compile(r"[A-Za-z0-9._-]+")
"""What a pair id of a pairs CSV may hold: it becomes part of the keypoint file names."""


@dataclass(frozen=True)
class ScanPair:
    """One row of a pairs CSV: the two CT files and, optionally, row-aligned landmark files."""

    id: str
    fixed: Path
    moving: Path
    fixed_landmarks: Path | None = None
    moving_landmarks: Path | None = None


def read_pairs_csv(path: str | Path) -> list[ScanPair]:
    """Parse a pairs CSV: header ``id,fixed,moving[,fixed_landmarks,moving_landmarks]``, one pair
    per row, paths relative to the CSV file. Every named file must exist; ids must be unique.
    Raises :class:`InputError` naming the CSV (or the missing file) otherwise."""
    p = require_file(path)
    try:
        reader = csv.DictReader(p.read_text(encoding="utf-8-sig").splitlines())  # a spreadsheet export's BOM
        header = reader.fieldnames or []
        rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"unreadable pairs CSV ({exc})", p) from None
    missing = [c for c in PAIRS_COLUMNS if c not in header]
    if missing:
        raise InputError(f"pairs CSV needs the columns {', '.join(PAIRS_COLUMNS)} (missing: {', '.join(missing)})", p)
    pairs: list[ScanPair] = []
    for n, row in enumerate(rows, start=2):
        if row.get(None):  # more fields than the header names (csv keeps them under None)
            raise InputError(f"line {n}: {len(header) + len(row[None])} fields under a header of {len(header)} "
                             f"columns ({', '.join(header)})", p)
        cells = {k: (v or "").strip() for k, v in row.items() if k is not None}
        if not all(cells.get(c) for c in PAIRS_COLUMNS):
            raise InputError(f"line {n}: id, fixed and moving must not be empty", p)
        if not PAIR_ID.fullmatch(cells["id"]) or cells["id"] in (".", ".."):
            raise InputError(f"line {n}: id {cells['id']!r} may hold only letters, digits, '.', '_' and '-' "
                             "(it names the keypoint files)", p)
        lm = (cells.get("fixed_landmarks", ""), cells.get("moving_landmarks", ""))
        if bool(lm[0]) != bool(lm[1]):
            raise InputError(f"line {n}: give both fixed_landmarks and moving_landmarks or neither", p)
        files = [require_file(p.parent / cells[c]) for c in ("fixed", "moving")]
        lms = [require_file(p.parent / f) for f in lm] if lm[0] else [None, None]
        pairs.append(ScanPair(cells["id"], files[0], files[1], lms[0], lms[1]))
    require_pair_ids([q.id for q in pairs], p, "the pairs CSV")
    require_case_distinct_ids([q.id for q in pairs], p)  # they name the keypoint files: ID_fixed.csv, ...
    return pairs


def build_keypoint_dataset(pairs_csv: str | Path, out_dir: str | Path, *, lung_mask: bool = False,
                           keypoints: PairKeypointConfig = PairKeypointConfig(), folds: int | None = None,
                           device: str = "auto", verbose: bool = True) -> Path:
    """Keypoints of every scan of a pairs CSV (:func:`read_pairs_csv`) and a keypoint dataset JSON
    over them, ready for ``pretrain-random``, ``cycle`` and ``evaluate``.

    Writes ``out_dir/keypoints/{id}_fixed.csv`` and ``{id}_moving.csv`` (world mm; the moving scan
    with ``keypoints.moving``, denser), ``out_dir/dataset.json`` (paths relative to it; landmark
    files in mm, when the CSV names them, are referenced where they are, never read by training) and
    ``out_dir/dataset.json.config.json`` (the detector settings, counts and timings). A landmark file
    of Learn2Reg voxel indices (a headerless CSV) is placed on its own scan's grid (the fixed scan's
    affine for ``fixed_landmarks``, the moving scan's for ``moving_landmarks``, as the keypoints) and
    written in mm as ``out_dir/landmarks/{id}_fixed.csv`` / ``{id}_moving.csv``, which the dataset
    references instead (the keypoints are in world mm; the dataset has no one grid for indices). With
    ``folds``: that many folds of consecutive pairs (sizes differ by at most one), each held out
    once, for ``cycle --folds all``. Every scan is read and detected before anything is written;
    an existing ``out_dir/dataset.json`` is not overwritten.

    Returns the path of ``dataset.json``.
    """
    if folds is not None and not whole_number(folds):  # a library caller's "2"
        raise InputError(f"--folds {folds!r}: need a whole number of folds, 2 or more")
    pairs = read_pairs_csv(pairs_csv)
    out = require_output_dir(out_dir)
    refuse_output_in_run(out, "-o")
    dataset_json = out / "dataset.json"
    if dataset_json.exists():
        raise InputError("a dataset.json is already there; choose another directory", dataset_json)
    if folds is not None and not 2 <= folds <= len(pairs):
        allowed = "2" if len(pairs) == 2 else f"2 to {len(pairs)}"
        if len(pairs) < 2:
            raise InputError(f"--folds {folds}: cross-validation needs at least 2 pairs, the list has {len(pairs)}",
                             pairs_csv)
        raise InputError(f"--folds {folds}: expected {allowed} (at most one fold per pair; the list has "
                         f"{len(pairs)})", pairs_csv)
    for q in pairs:  # counts and numbers now, before minutes of detection; voxel indices get their grid below
        if q.fixed_landmarks is not None:
            indices = read_landmark_pair(q.fixed_landmarks, q.moving_landmarks, f"pair {q.id}",
                                         read=lambda f: read_points(f, spacing_mm=INDEX_CHECK_SPACING))
            for ct, landmarks, index in zip((q.fixed, q.moving), (q.fixed_landmarks, q.moving_landmarks), indices):
                if holds_voxel_indices(landmarks):
                    _require_indices_inside(index, ct, landmarks)
    dev = resolve_device(device)
    texts: dict[str, str] = {}
    voxel_landmarks: dict[str, tuple[Path, str]] = {}  # landmarks/{id}_{role}.csv -> (voxel-index file, mm text)
    counts: dict[str, dict[str, int]] = {}
    grids: dict[str, dict[str, dict]] = {}  # per scan: its grid and the NMS radius in its voxels
    t0 = time.perf_counter()
    console = make_console()
    with Progress(transient=True, disable=not verbose or not console.is_terminal, console=console) as progress:
        task = progress.add_task("keypoints", total=2 * len(pairs))
        for q in pairs:
            for role, ct, config in (("fixed", q.fixed, keypoints.fixed), ("moving", q.moving, keypoints.moving)):
                progress.update(task, description=f"keypoints: {escape(q.id)} {role}")
                volume = read_nifti(ct)
                result = detect_keypoints(volume, lung_mask=lung_mask, config=config, device=dev)
                texts[f"{q.id}_{role}.csv"] = points_csv(result.points_mm)
                landmarks = q.fixed_landmarks if role == "fixed" else q.moving_landmarks
                if landmarks is not None and holds_voxel_indices(landmarks):
                    voxel_landmarks[f"landmarks/{q.id}_{role}.csv"] = (
                        landmarks, points_csv(read_points(landmarks, affine=volume.affine)))
                counts.setdefault(q.id, {})[role] = int(result.points_mm.shape[0])
                grids.setdefault(q.id, {})[role] = {
                    "shape": list(volume.shape), "spacing_mm": list(volume.spacing),
                    "nms_radius_voxels": list(config.nms_radius_voxels(volume.spacing))}
                progress.advance(task)

    def rel(path: Path) -> str:
        return Path(os.path.relpath(path.resolve(), out.resolve())).as_posix()

    entries = []
    for q in pairs:
        entry = {"id": q.id, "fixed_keypoints": f"keypoints/{q.id}_fixed.csv",
                 "moving_keypoints": f"keypoints/{q.id}_moving.csv"}
        if q.fixed_landmarks is not None:
            for role, path in (("fixed", q.fixed_landmarks), ("moving", q.moving_landmarks)):
                converted = f"landmarks/{q.id}_{role}.csv"
                entry[f"{role}_landmarks"] = converted if converted in voxel_landmarks else rel(path)
        entries.append(entry)
    obj: dict = {"name": Path(pairs_csv).stem, "pairs": entries}
    if folds is not None:
        bounds = [round(k * len(pairs) / folds) for k in range(folds + 1)]
        obj["folds"] = [[q.id for q in pairs[a:b]] for a, b in zip(bounds[:-1], bounds[1:])]
    record = {
        **provenance(dev), "command": "keypoints --pairs", "pairs_csv": str(pairs_csv),
        "lung_mask": lung_mask, "device": str(dev), "foerstner": keypoints,
        "lung_mask_config": LungMaskConfig() if lung_mask else None, "num_keypoints": counts, "scans": grids,
        "landmarks_from_voxel_indices": {name: str(src) for name, (src, _) in voxel_landmarks.items()},
        "seconds": round(time.perf_counter() - t0, 3)}
    with staged_file_set() as files:  # every file of the dataset, or none (an interruption leaves no half)
        for name, text in texts.items():
            atomic_write_text(files(out / "keypoints" / name), text)
        for name, (_, text) in voxel_landmarks.items():
            atomic_write_text(files(out / name), text)
        write_json(files(config_path_for(dataset_json)), record)
        write_json(files(dataset_json), obj)
    return dataset_json
