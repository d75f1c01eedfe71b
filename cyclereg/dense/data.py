"""Learn2Reg volume datasets and intensity preprocessing.

A Learn2Reg ``*_dataset.json`` lists ``training`` entries (``image``, ``label``) and
``registration_val`` pairs (``fixed``, ``moving`` image paths); paths are relative to the
JSON file. Label maps of a pair are found through the ``training`` (or ``test``) entries
of the same image, else by replacing ``imagesTr`` with ``labelsTr`` in the path.
"""

from __future__ import annotations

import os
import re

from dataclasses import dataclass
from pathlib import Path

import torch

from cyclereg.datasets import is_label_number, read_json, require_case_distinct_ids
from cyclereg.dense.config import PreprocessConfig
from cyclereg.errors import InputError
from cyclereg.frames import LOW_PRECISION, inside_grid, voxel_to_world, world_to_voxel
from cyclereg.volumeio import Volume, check_same_grid
from cyclereg.warp import warp_between_grids, warp_labels


# ----------------------------------------------------------------------------- preprocessing
def resolve_mode(image: torch.Tensor, cfg: PreprocessConfig, hint: str | None = None) -> str:
    """The preprocessing mode for ``image``: ``cfg.mode`` unless ``auto``; then the
    dataset's modality ``hint`` ("CT", "MRI", ...) if given, else the intensity range.
    The hint names CT as a word or as the start of its first word ("Lung CT,", "CTA"; words are
    split at anything not a letter or digit, so "FBCT" and "CBCT" are no CT)."""
    if cfg.mode != "auto":
        return cfg.mode
    if hint:
        h = hint.lower()
        words = [w for w in re.split(r"[\W_]+", h) if w]
        if "ct" in words or (words and words[0].startswith("ct")):
            return "ct"
        if "mr" in h or "t1" in h or "t2" in h:
            return "mri"
    return "ct" if float(image.min()) < cfg.auto_ct_below_hu else "mri"


QUANTILE_SAMPLES = 2_000_000
"""MRI percentiles are taken on a regular subsample of at most about this many voxels (torch.quantile
is limited to 16M elements; a subsample is exact enough and fast)."""

MIN_INTENSITY_RANGE = 1e-6
"""Floor of the MRI percentile range, relative to the image's largest magnitude ``max |x|`` (a few float32 ulp
of it; at least the dtype's smallest normal number), so that a (nearly) constant image is not divided by 0,
whatever its intensity unit."""


def preprocess(image: torch.Tensor, cfg: PreprocessConfig, mode: str | None = None) -> torch.Tensor:
    """Intensity preprocessing of a ``(D, H, W)`` (or any-shape) float image.

    ``ct``: ``clip(x / ct_scale_hu, *ct_clip)``; ``mri``: percentile normalisation to
    [0, 1]; ``none``: unchanged. ``mode`` defaults to :func:`resolve_mode`. The result keeps a
    floating ``image``'s dtype; an integer image gives float32.
    """
    mode = mode or resolve_mode(image, cfg)
    x = image if image.is_floating_point() else image.float()
    if mode == "ct":
        return (x / cfg.ct_scale_hu).clamp(*cfg.ct_clip)
    if mode == "mri":
        flat = x.flatten()
        if flat.numel() > QUANTILE_SAMPLES:  # quantile on a strided subsample (exact enough, fast)
            flat = flat[:: flat.numel() // QUANTILE_SAMPLES + 1]
        if flat.dtype in LOW_PRECISION:  # torch.quantile takes float32 / float64 only
            flat = flat.float()
        lo, hi = torch.quantile(flat, torch.tensor([cfg.mri_percentiles[0] / 100, cfg.mri_percentiles[1] / 100],
                                                   dtype=flat.dtype, device=flat.device)).to(x.dtype)
        magnitude = float(torch.stack(torch.aminmax(x)).abs().max())  # the floor's unit: max |x|
        scale = (hi - lo).clamp_min(max(MIN_INTENSITY_RANGE * magnitude, torch.finfo(x.dtype).tiny))
        return ((x - lo) / scale).clamp(0.0, 1.0)
    if mode == "none":
        return x
    raise ValueError(f"unknown preprocessing mode {mode!r}")


# ----------------------------------------------------------------------------- grids
def require_contrast(volume: Volume) -> Volume:
    """:class:`InputError` naming the file of a volume whose voxels all hold one value: its features
    carry no information, and registering it gives an arbitrary field."""
    lo, hi = float(volume.data.min()), float(volume.data.max())
    if lo == hi:
        raise InputError(f"volume is constant (every voxel {lo:g}): nothing to register", volume.path)
    return volume


def check_pair_grids(fixed: Volume, moving: Volume, fixed_labels: Volume, moving_labels: Volume) -> None:
    """:func:`check_same_grid` for a labelled pair: both scans on one grid, each label map on its scan's."""
    check_same_grid(fixed, moving)
    check_same_grid(fixed, fixed_labels, what="fixed label map")
    check_same_grid(moving, moving_labels, what="moving label map", ref="moving image")


def resample_onto(volume: Volume, reference: Volume, *, labels: bool = False) -> Volume:
    """``volume`` resampled onto ``reference``'s grid through world millimetres.

    Every voxel ``x`` of the reference grid takes ``volume``'s value at the world point
    ``A_ref x`` (trilinear for images, nearest neighbour for label maps). Outside
    ``volume``'s extent an image repeats its edge value and a label map is 0 (background).
    Returns a :class:`Volume` with ``reference``'s shape and affine and ``volume``'s path
    (so later messages still name the file that was read).
    """
    src = volume.data[None, None]
    zero = torch.zeros(1, 3, 1, 1, 1).expand(1, 3, *reference.shape)  # a view: no full-size field in memory
    if labels:
        out = warp_labels(src, zero, labels_affine=volume.affine, fixed_affine=reference.affine)[0, 0]
    else:
        out = warp_between_grids(src.float(), volume.affine, zero, reference.affine)[0, 0]
    return Volume(data=out, affine=reference.affine.copy(), path=volume.path)


OVERLAP_SAMPLES_PER_AXIS = 64
"""Lattice of the reference grid's voxel centres (per axis, both ends included) on which
:func:`overlap_fraction` counts the overlap: an overlap thinner than 1/63 of the reference's extent
along an axis may be missed (reported as none)."""


def overlap_fraction(volume: Volume, reference: Volume, *, samples: int = OVERLAP_SAMPLES_PER_AXIS) -> float:
    """Share of ``reference``'s voxel centres whose world point lies within ``volume``'s voxels
    (index ``-0.5 .. n - 0.5`` along each axis), counted on a lattice of at most ``samples`` voxel
    centres per axis. 0 when the two scans share no world space, whatever their values: resampling
    repeats ``volume``'s edge outside it, so a scan beside the reference along one axis is not
    constant on the reference grid (its face is copied across it)."""
    axes = [torch.linspace(0, n - 1, min(n, samples), dtype=torch.float64) for n in reference.shape]
    centres = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    vox = world_to_voxel(voxel_to_world(centres, torch.from_numpy(reference.affine)), torch.from_numpy(volume.affine))
    return float(inside_grid(vox, volume.shape).double().mean())


# ----------------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class VolumePair:
    """One registration pair: image paths, (optional) label paths and the pair's id in its dataset
    (``FIXED_MOVING`` of :func:`scan_ids`, unique among the dataset's pairs)."""

    fixed: Path
    moving: Path
    fixed_labels: Path | None
    moving_labels: Path | None
    id: str


@dataclass(frozen=True)
class VolumeDataset:
    path: Path
    name: str
    modality: str | None
    label_names: dict[int, str]
    pairs: tuple[VolumePair, ...]


def case_id(path: Path) -> str:
    """Learn2Reg case number of a file name (``AbdomenCTCT_0007_0000.nii.gz`` -> ``0007``),
    or the file stem when there is none. Not unique where a case has several scans (Learn2Reg's
    ``disp_FFFF_MMMM`` file names use it so); ids of scans in a dataset: :func:`scan_ids`."""
    name = _stem(path)
    parts = name.split("_")
    digits = [p for p in parts if p.isdigit()]
    if len(parts) >= 3 and parts[-2].isdigit():
        return parts[-2]
    return digits[0] if digits else name


def _stem(path: Path) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _scan_number_id(path: Path) -> str:
    """Learn2Reg case and scan number (``LungCT_0001_0000.nii.gz`` -> ``0001_0000``), or the file stem."""
    parts = _stem(path).split("_")
    if len(parts) >= 3 and parts[-2].isdigit() and parts[-1].isdigit():
        return f"{parts[-2]}_{parts[-1]}"
    return _stem(path)


def scan_ids(paths) -> list[str]:
    """Short ids of scans, unique among the distinct ``paths`` (one id per entry, equal paths equal ids).

    The Learn2Reg case number (:func:`case_id`, ``0007``) where it alone tells the scans apart, as in
    inter-patient tasks with one scan per case; case and scan number (``0001_0000``) for the scans of a
    case that has several (intra-patient tasks: ``_0000`` and ``_0001`` of one case); the file stem
    where even that repeats, then ``STEM~N`` for equal names in different folders."""
    resolved = [Path(p).resolve() for p in paths]
    distinct = list(dict.fromkeys(resolved))
    ids = {q: case_id(q) for q in distinct}
    for refine in (_scan_number_id, _stem):
        counts: dict[str, int] = {}
        for q in distinct:
            counts[ids[q]] = counts.get(ids[q], 0) + 1
        for q in distinct:
            if counts[ids[q]] > 1:
                ids[q] = refine(q)
    ids = dict(zip(distinct, unique_ids([ids[q] for q in distinct])))
    return [ids[q] for q in resolved]


def unique_ids(names: list[str]) -> list[str]:
    """``names`` made unique, in order: a name listed once is kept; of a name listed more than once the
    first keeps it and each later one becomes ``NAME~N``, with the smallest ``N >= 2`` that is no other
    id (a file may itself be called ``x~2``)."""
    used = set(names)  # every listed name is its first holder's: no later one may become it
    seen: set[str] = set()
    out = []
    for name in names:
        if name in seen:
            n = 2
            while f"{name}~{n}" in used:
                n += 1
            out.append(f"{name}~{n}")
            used.add(out[-1])
        else:
            seen.add(name)
            out.append(name)
    return out


def pair_ids(id_pairs) -> list[str]:
    """Ids of registration pairs from their scans' ids ``(fixed, moving)``: ``FIXED_MOVING``, unique
    (:func:`unique_ids`: scan ids holding ``_`` can join alike, ``p1`` + ``t2_b`` and ``p1_t2`` + ``b``)."""
    return unique_ids([f"{a}_{b}" for a, b in id_pairs])


def _volume_pair_ids(pairs) -> list[str]:
    """Ids of ``(fixed, moving)`` scan path pairs: :func:`pair_ids` of their :func:`scan_ids` (file names)."""
    scans = list(dict.fromkeys(scan for pair in pairs for scan in pair))  # each scan resolved once, not per pair
    ids = dict(zip(scans, scan_ids(scans)))
    return pair_ids([(ids[a], ids[b]) for a, b in pairs])


def _require_case_distinct_pairs(pairs, path: Path) -> None:
    """:func:`~cyclereg.datasets.require_case_distinct_ids` of the pair ids training gives the ``(fixed, moving)``
    scan ``pairs`` (:func:`_volume_pair_ids`), naming the dataset ``path``."""
    require_case_distinct_ids(_volume_pair_ids(pairs), path)


def _scan_path(root: Path, rel, path: Path, where: str) -> Path:
    """The absolute path of a scan a dataset JSON (``path``, in folder ``root``) names at ``where``
    (e.g. ``"registration_val entry 0: 'fixed'"``); :class:`InputError` when it is not a path text
    (``null`` or a number would name a file nobody wrote)."""
    if not isinstance(rel, str) or not rel.strip():
        raise InputError(f"{where} should be a file path, got {rel!r}", path)
    return (root / rel).resolve()


def _registration_val(obj: dict, path: Path) -> list[tuple[Path, Path]]:
    """The ``(fixed, moving)`` scan paths of a Learn2Reg dataset's ``registration_val`` entries, in order
    (``[]`` when the key is absent, null or empty); :class:`InputError` naming ``path`` for anything but a
    list of ``{"fixed": path, "moving": path}`` objects. Training leaves these scans out, so a malformed
    entry must not be skipped."""
    raw = obj.get("registration_val")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InputError("'registration_val' should be a list of {\"fixed\": path, \"moving\": path} pairs, got "
                         f"{type(raw).__name__}", path)
    pairs = []
    for n, entry in enumerate(raw):
        if not isinstance(entry, dict) or "fixed" not in entry or "moving" not in entry:
            raise InputError(f"registration_val entry {n} needs 'fixed' and 'moving'", path)
        pairs.append(tuple(_scan_path(path.parent, entry[k], path, f"registration_val entry {n}: '{k}'")
                           for k in ("fixed", "moving")))
    return pairs


def label_guess(image: Path) -> Path | None:
    """Where the Learn2Reg layout keeps the label map of ``image``: its path with the last ``imagesTr`` /
    ``imagesTs`` folder as ``labelsTr`` / ``labelsTs`` (folders of those names higher up are left as they are);
    ``None`` when the image lies in neither."""
    parts = list(Path(image).parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] in ("imagesTr", "imagesTs"):
            parts[i] = "labels" + parts[i][len("images"):]
            return Path(*parts)
    return None


def dataset_modality(obj: dict, path: Path) -> str | None:
    """The imaging modality of a Learn2Reg dataset JSON ``obj`` (``path``): its ``modality`` text, or the one
    modality of its per-channel dict (``{"0": "CT"}``); ``None`` when absent. :class:`InputError` naming
    ``path`` for a value that is no text, or a dict naming several modalities (Learn2Reg's multi-modal tasks,
    ``{"0": "MR", "1": "CT"}``: each scan would need its own preprocessing, which is not supported)."""
    modality = obj.get("modality")
    if isinstance(modality, dict):
        odd = next((v for v in modality.values() if not isinstance(v, str)), None)
        if odd is not None or None in modality.values():
            raise InputError(f"'modality' should name the imaging modality of each channel (e.g. {{\"0\": \"CT\"}}), "
                             f"got {modality!r}", path)
        kinds = sorted(set(modality.values()))
        if len(kinds) > 1:
            raise InputError(f"'modality' names several modalities ({', '.join(kinds)}): multi-modal datasets (one "
                             "modality per channel) are not supported; list single-modality scans", path)
        modality = next(iter(modality.values()), None)
    if modality is not None and not isinstance(modality, str):
        raise InputError(f"'modality' should name the imaging modality (e.g. {{\"0\": \"CT\"}}), got {modality!r}",
                         path)
    return modality


def load_volume_dataset(path: str | Path, *, both_directions: bool = False) -> VolumeDataset:
    """Parse a Learn2Reg dataset JSON.

    Args:
        both_directions: also evaluate every listed pair in the reverse direction (pairs
            already listed both ways are not duplicated).
    """
    p = Path(path)
    obj = read_json(p)
    root = p.parent

    def res(rel, where: str) -> Path:
        return _scan_path(root, rel, p, where)

    label_of: dict[Path, tuple[Path, str]] = {}  # image -> (its label map, the entry that gave it)
    image_of: dict[Path, tuple[Path, str]] = {}  # label map -> (its image, the entry)
    for key in ("training", "test"):
        entries = obj.get(key) or []
        if not isinstance(entries, list):
            raise InputError(f"'{key}' should be a list of image entries, got {type(entries).__name__}", p)
        for n, entry in enumerate(entries):
            if isinstance(entry, dict) and entry.get("image") and entry.get("label"):
                where = f"{key} entry {n}"
                img, lab = res(entry["image"], f"{where}: 'image'"), res(entry["label"], f"{where}: 'label'")
                # a copy-paste slip would score a scan against another scan's labels without a word
                if img in label_of and label_of[img][0] != lab:
                    raise InputError(f"{label_of[img][1]} and {where} give the image {entry['image']} two label maps",
                                     p)
                if lab in image_of and image_of[lab][0] != img:
                    raise InputError(f"{image_of[lab][1]} and {where} give the label map {entry['label']} to two "
                                     "images", p)
                label_of.setdefault(img, (lab, where))
                image_of.setdefault(lab, (img, where))

    val = _registration_val(obj, p)
    if not val:
        raise InputError("no 'registration_val' pairs in the dataset", p)
    written: dict[Path, Path] = {}  # scan -> its path as the JSON writes it (a link's own folder, not its target's)
    for entry, pair in zip(obj["registration_val"], val):
        for k, scan in zip(("fixed", "moving"), pair):
            written.setdefault(scan, Path(os.path.abspath(root / entry[k])))

    def labels_for(img: Path) -> Path | None:
        if img in label_of:
            return label_of[img][0]
        guess = label_guess(written.get(img, img))
        return guess if guess is not None and guess.exists() else None

    ordered: dict[tuple[Path, Path], None] = {}  # the pairs in order, each once
    listed: dict[tuple[Path, Path], int] = {}  # pair as listed -> its entry number
    for n, (f, m) in enumerate(val):
        entry = obj["registration_val"][n]
        if (f, m) in listed:  # a copy-paste slip would silently shrink the evaluation
            raise InputError(f"registration_val entries {listed[(f, m)]} and {n} list the same pair "
                             f"({entry['fixed']} -> {entry['moving']})", p)
        if f == m:  # scored Dice 1, it would lift the mean
            raise InputError(f"registration_val entry {n} pairs a scan with itself ({entry['fixed']} -> "
                             f"{entry['moving']})", p)
        listed[(f, m)] = n
        for a, b in ((f, m), (m, f)) if both_directions else ((f, m),):
            ordered[(a, b)] = None
    names = _volume_pair_ids(list(ordered))
    require_case_distinct_ids(names, p)  # file names: 'Ab' and 'ab' in two folders
    pairs = [VolumePair(a, b, labels_for(a), labels_for(b), name) for (a, b), name in zip(ordered, names)]
    modality = dataset_modality(obj, p)
    label_names: dict[int, str] = {}
    labels = obj.get("labels")
    if isinstance(labels, dict):
        # Learn2Reg nests the names under the channel ("0": {"1": "spleen", ...}); the flat form
        # ({"0": "background", "1": "spleen", ...}, Decathlon / nnU-Net) lists them directly
        inner = labels["0"] if isinstance(labels.get("0"), dict) else labels
        if isinstance(inner, dict):
            for k, v in inner.items():
                if is_label_number(str(k)):
                    label_names[int(k)] = str(v)
    return VolumeDataset(path=p, name=str(obj.get("name", p.stem)), modality=modality,
                         label_names=label_names, pairs=tuple(pairs))


def training_images(path: str | Path, *, held_out: bool = True) -> list[Path]:
    """Image paths of a Learn2Reg dataset's ``training`` entries (label paths are not read).

    Args:
        held_out: leave out every image that occurs in a ``registration_val`` pair (the
            Learn2Reg protocol: train on the other scans, evaluate on those pairs).
    """
    p = Path(path)
    obj = read_json(p)
    root = p.parent
    entries = obj.get("training")
    if not isinstance(entries, list) or not entries:
        raise InputError("no 'training' images in the dataset", p)
    images: list[Path] = []
    entry_of: dict[Path, int] = {}
    for n, e in enumerate(entries):
        img = e.get("image") if isinstance(e, dict) else e
        if img is None:
            raise InputError(f"training entry {n} has no 'image'", p)
        path = _scan_path(root, img, p, f"training entry {n}: 'image'")
        if path in entry_of:  # two ids for one scan, and pairs of a scan with itself
            raise InputError(f"training entries {entry_of[path]} and {n} list the same image ({img})", p)
        entry_of[path] = n
        images.append(path)
    if held_out:
        val = {scan for pair in _registration_val(obj, p) for scan in pair}
        images = [im for im in images if im not in val]
    _require_case_distinct_pairs([(a, b) for a in images for b in images if a != b], p)  # every pair training may make
    return images


def training_pairs(path: str | Path, *, held_out: bool = True) -> list[tuple[Path, Path]] | None:
    """The ``(fixed, moving)`` scan paths of a paired Learn2Reg dataset's ``training_paired_images``
    (``"pairings": "paired"``, e.g. LungCT, ThoraxCBCT: the scans of one case go together), in order;
    ``None`` for an unpaired dataset (every two training images make a pair). ``held_out``: leave out the
    pairs with a scan of a ``registration_val`` pair. :class:`InputError` naming ``path`` for a paired
    dataset without a list of ``{"fixed": path, "moving": path}`` pairs."""
    p = Path(path)
    obj = read_json(p)
    raw = obj.get("training_paired_images")
    if not raw and obj.get("pairings") != "paired":  # absent, null or [] in an unpaired dataset
        return None
    if not isinstance(raw, list) or not raw:
        raise InputError("a paired dataset ('pairings': 'paired') needs its pairs in 'training_paired_images', a list "
                         "of {\"fixed\": path, \"moving\": path}", p)
    pairs, entry_of = [], {}
    for n, entry in enumerate(raw):
        if not isinstance(entry, dict) or "fixed" not in entry or "moving" not in entry:
            raise InputError(f"training_paired_images entry {n} needs 'fixed' and 'moving'", p)
        pair = tuple(_scan_path(p.parent, entry[k], p, f"training_paired_images entry {n}: '{k}'")
                     for k in ("fixed", "moving"))
        if pair[0] == pair[1]:
            raise InputError(f"training_paired_images entry {n} pairs a scan with itself ({entry['fixed']})", p)
        if pair in entry_of:
            raise InputError(f"training_paired_images entries {entry_of[pair]} and {n} list the same pair", p)
        entry_of[pair] = n
        pairs.append(pair)
    if held_out:
        val = {scan for pair in _registration_val(obj, p) for scan in pair}
        pairs = [q for q in pairs if not (set(q) & val)]
    _require_case_distinct_pairs(pairs + [(m, f) for f, m in pairs], p)  # either direction
    return pairs
