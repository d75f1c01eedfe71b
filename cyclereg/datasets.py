"""Dataset JSON files: the keypoint layout of ``copd-keypoints/dataset.json`` and the
Learn2Reg layout (``*_dataset.json`` with ``training`` / ``registration_val``).

Only :func:`dataset_kind` and the keypoint loader live here; the volume loader is in
:mod:`cyclereg.dense.data`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from cyclereg.errors import InputError, finite_number, require_file, whole_number


JSON_READ_ERRORS = (OSError, UnicodeDecodeError, ValueError, RecursionError)
"""What reading and parsing a JSON file can raise: unreadable, not UTF-8, a syntax error or an integer too
long for Python (``ValueError``), nesting too deep (``RecursionError``)."""


def is_label_number(text: str) -> bool:
    """Whether ``text`` is a label number as a JSON key or an option writes it: ASCII digits only
    (``str.isdigit`` also takes ``'²'``, which ``int()`` refuses)."""
    return text.isascii() and text.isdigit()


def read_json(path: str | Path) -> dict:
    p = require_file(path)
    try:
        obj = json.loads(p.read_text(encoding="utf-8-sig"))  # a byte-order mark (Windows editors) is not JSON
    except JSON_READ_ERRORS as exc:
        raise InputError(f"not valid JSON ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})", p) from None
    if not isinstance(obj, dict):
        raise InputError("expected a JSON object at top level", p)
    return obj


def require_pair_ids(ids: list[str], path: Path, what: str) -> None:
    """:class:`InputError` naming ``path`` when ``ids`` is empty ("no pairs in {what}") or lists an
    id twice."""
    if not ids:
        raise InputError(f"no pairs in {what}", path)
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise InputError(f"pair id {dup[0]!r} is listed more than once", path)


def require_case_distinct_ids(ids: list[str], path: Path) -> None:
    """:class:`InputError` naming ``path`` and two of ``ids`` that differ only in letter case (``A`` and ``a``):
    training writes a file per pair named by its id (``pseudo{t}.parts/{id}.pt``; ``keypoints --pairs`` its
    ``{id}_fixed.csv`` ...), and on a case-insensitive file system (macOS, Windows) the two would be one file,
    one pair's taken for the other's."""
    seen: dict[str, str] = {}
    for i in ids:
        other = seen.setdefault(i.lower(), i)
        if other != i:
            raise InputError(f"pair ids {other!r} and {i!r} differ only in letter case: training writes a file per "
                             "pair named by its id, and on a case-insensitive file system (macOS, Windows) they "
                             "would be one file; rename one", path)


def dataset_kind(path: str | Path) -> str:
    """``"keypoints"`` for a keypoint-cloud dataset, ``"volumes"`` for a Learn2Reg dataset."""
    obj = read_json(path)
    pairs = obj.get("pairs")
    learn2reg = "training" in obj or "registration_val" in obj
    if isinstance(pairs, list) and pairs and isinstance(pairs[0], dict) and (
            "fixed_keypoints" in pairs[0] or not learn2reg):  # a pair lacking a key: the reader names it
        return "keypoints"
    if learn2reg:
        return "volumes"
    if isinstance(pairs, list) and not pairs:
        raise InputError("'pairs' is empty: a keypoint dataset needs at least one pair", path)
    raise InputError("unknown dataset layout: expected 'pairs' with keypoints, or Learn2Reg 'training'/'registration_val'", path)


@dataclass(frozen=True)
class KeypointPair:
    """One keypoint-cloud pair. Landmark paths are for evaluation only."""

    id: str
    fixed_keypoints: Path
    moving_keypoints: Path
    fixed_landmarks: Path | None
    moving_landmarks: Path | None


DATASET_VOXEL_HINT = ("the dataset gives no spacing_zyx_mm and volume_shape_zyx (its grid) to place them on; add "
                      "them, or write the points in mm with the header x_mm,y_mm,z_mm")
"""How a keypoint dataset's headerless point file gets its voxel spacing (the end of the message)."""


@dataclass(frozen=True)
class KeypointDataset:
    """A keypoint dataset: pairs, optional folds (lists of held-out pair ids), unit box."""

    path: Path
    name: str
    pairs: tuple[KeypointPair, ...]
    folds: tuple[tuple[str, ...], ...]
    volume_shape_zyx: tuple[int, int, int] | None
    spacing_zyx_mm: tuple[float, float, float] | None

    def pair(self, pair_id: str) -> KeypointPair:
        for p in self.pairs:
            if p.id == pair_id:
                return p
        raise KeyError(pair_id)

    @property
    def has_volume_grid(self) -> bool:
        """Whether the dataset names the volume grid its points lie in (``volume_shape_zyx`` and
        ``spacing_zyx_mm``, given together): the unit frame's box and the grid ``evaluate`` scores SDlogJ on."""
        return self.volume_shape_zyx is not None and self.spacing_zyx_mm is not None

    def voxel_spacing_xyz_mm(self) -> tuple[float, float, float] | None:
        """Voxel size along world x, y, z [mm] of the dataset's grid (:func:`cyclereg.frames.spacing_xyz`
        of ``spacing_zyx_mm``), the spacing of its headerless (Learn2Reg voxel-index) point files;
        ``None`` without a grid."""
        from cyclereg.frames import spacing_xyz

        return None if self.spacing_zyx_mm is None else spacing_xyz(self.spacing_zyx_mm)

    def read_points(self, path: str | Path):
        """A point file of this dataset as ``(N, 3)`` mm: :func:`cyclereg.pointio.read_points`, with a
        headerless CSV (Learn2Reg voxel indices ``(i, j, k)`` along x, y, z) placed on the dataset's grid,
        ``mm = index * spacing`` (:meth:`voxel_spacing_xyz_mm`; first voxel at the origin, the frame of
        ``volume_shape_zyx``)."""
        from cyclereg.pointio import read_points

        return read_points(path, spacing_mm=self.voxel_spacing_xyz_mm(), voxel_hint=DATASET_VOXEL_HINT)

    def read_landmarks(self, pair: KeypointPair, what: str):
        """The row-aligned landmarks ``(fixed, moving)`` (mm) of ``pair``, read as :meth:`read_points`;
        ``what`` names the pair in messages (:func:`cyclereg.pointio.read_landmark_pair`)."""
        from cyclereg.pointio import read_landmark_pair

        return read_landmark_pair(pair.fixed_landmarks, pair.moving_landmarks, what, read=self.read_points)

    def fold_of(self, pair_id: str) -> int | None:
        """1-based index of the fold that holds ``pair_id`` out, or None."""
        for k, test in enumerate(self.folds, start=1):
            if pair_id in test:
                return k
        return None

    def training_ids(self, fold: int | None) -> list[str]:
        """Pair ids used for training in ``fold`` (1-based; None = all pairs)."""
        held = set(self.folds[fold - 1]) if fold else set()
        return [p.id for p in self.pairs if p.id not in held]


def select_folds(ds: "KeypointDataset", fold: str | int | None, flag: str = "--fold") -> list[int | None]:
    """The folds ``fold`` selects (``None`` or ``"all"``: every fold; ``[None]`` for a dataset without
    folds); ``flag``: the option that gave it, for messages."""
    if not ds.folds:
        if fold not in (None, "all"):
            raise InputError(f"{flag} {fold}: the dataset defines no folds", ds.path)
        return [None]
    if fold in (None, "all"):
        return list(range(1, len(ds.folds) + 1))
    if isinstance(fold, bool) or (isinstance(fold, float) and not fold.is_integer()):
        k = 0  # int() would take True as fold 1 and truncate 1.5 to it
    else:
        try:
            k = int(fold)
        except (TypeError, ValueError, OverflowError):
            k = 0
    if not 1 <= k <= len(ds.folds):
        raise InputError(f"{flag} {fold}: expected 'all' or 1..{len(ds.folds)}", ds.path)
    return [k]


MAX_VOLUME_VOXELS = 2**31
"""Most voxels a keypoint dataset's ``volume_shape_zyx`` may hold (a 1290^3 grid; CT scans have about
10^8): scoring evaluates a dense field (3 x 4 bytes per voxel) on it, and torch's index arithmetic
overflows on absurd grids."""


def _is_pair_name(value) -> bool:
    """Whether a dataset's pair ``id`` names a pair: a text that is not blank, or a whole number (JSON
    ``1`` is the pair ``"1"``); ``null``, ``true``, ``1.5``, lists and objects are not names."""
    return bool(value.strip()) if isinstance(value, str) else whole_number(value)


def load_keypoint_dataset(path: str | Path) -> KeypointDataset:
    """Parse a keypoint dataset JSON; paths are resolved relative to the JSON file."""
    p = Path(path)
    obj = read_json(p)
    root = p.parent
    pairs = []
    raw_pairs = obj.get("pairs")
    if raw_pairs is not None and not isinstance(raw_pairs, list):  # a dict's keys were read as entries
        raise InputError("'pairs' should be a list of {\"id\", \"fixed_keypoints\", \"moving_keypoints\", ...} entries, "
                         f"got {type(raw_pairs).__name__}", p)
    for n, entry in enumerate(raw_pairs or []):
        if isinstance(entry, dict) and bool(entry.get("fixed_landmarks")) != bool(entry.get("moving_landmarks")):
            given = "fixed_landmarks" if entry.get("fixed_landmarks") else "moving_landmarks"
            raise InputError(f"pairs[{n}] gives {given} alone: give both fixed_landmarks and moving_landmarks "
                             "(row-aligned) or neither", p)  # one alone was read as none: a pair left out silently
        pair_id = entry.get("id") if isinstance(entry, dict) else None
        if isinstance(entry, dict) and "id" in entry and not _is_pair_name(pair_id):
            raise InputError(f"pairs[{n}]: id {pair_id!r} is no pair name (a non-empty text, or a whole number)", p)
        for key in ("fixed_keypoints", "moving_keypoints"):  # "" would be the dataset's own folder
            if isinstance(entry, dict) and isinstance(entry.get(key), str) and not entry[key].strip():
                raise InputError(f"pairs[{n}].{key} is empty; give the path of a point file", p)
        try:
            pairs.append(KeypointPair(
                id=str(entry["id"]),
                fixed_keypoints=root / entry["fixed_keypoints"],
                moving_keypoints=root / entry["moving_keypoints"],
                fixed_landmarks=root / entry["fixed_landmarks"] if entry.get("fixed_landmarks") else None,
                moving_landmarks=root / entry["moving_landmarks"] if entry.get("moving_landmarks") else None,
            ))
        except (KeyError, TypeError):
            raise InputError(f"pairs[{n}] needs id, fixed_keypoints and moving_keypoints (a name and two file paths)",
                             p) from None
    ids = [q.id for q in pairs]
    require_pair_ids(ids, p, "dataset")
    require_case_distinct_ids(ids, p)
    folds: list[tuple[str, ...]] = []
    held: dict[str, int] = {}
    raw_folds = obj.get("folds")
    if raw_folds is None:  # absent or null: no folds ([] too); {} or 0 are no list, not "no folds"
        raw_folds = []
    if not isinstance(raw_folds, list):
        raise InputError(f"'folds' should be a list of folds (each a list of held-out pair ids), got {raw_folds!r}",
                         p)
    for k, f in enumerate(raw_folds, start=1):
        test = f.get("test") if isinstance(f, dict) else f
        if not isinstance(test, list) or not test:
            raise InputError(f"fold {k}: expected a non-empty list of held-out pair ids (or {{\"test\": [...]}})", p)
        for i in (str(v) for v in test):
            if i not in ids:
                raise InputError(f"fold {k} holds out {i!r}, which is not a pair id", p)
            if i in held:
                raise InputError(f"fold {k} lists {i!r} twice" if held[i] == k else
                                 f"pair {i!r} is held out by folds {held[i]} and {k}", p)
            held[i] = k
        folds.append(tuple(str(v) for v in test))
    shape = _positive_triple(obj.get("volume_shape_zyx"), "volume_shape_zyx", p, whole=True)
    voxels = math.prod(int(v) for v in shape) if shape is not None else 0
    if voxels > MAX_VOLUME_VOXELS:
        raise InputError(f"volume_shape_zyx {shape}: {voxels} voxels, more than {MAX_VOLUME_VOXELS} (2^31); its "
                         "dense fields could not be made", p)
    spacing = _positive_triple(obj.get("spacing_zyx_mm"), "spacing_zyx_mm", p)
    if (shape is None) != (spacing is None):
        raise InputError("volume_shape_zyx and spacing_zyx_mm go together (the volume box): give both or neither", p)
    return KeypointDataset(
        path=p, name=str(obj.get("name", p.stem)), pairs=tuple(pairs), folds=tuple(folds),
        volume_shape_zyx=tuple(int(v) for v in shape) if shape else None,
        spacing_zyx_mm=tuple(float(v) for v in spacing) if spacing else None,
    )


def _positive_triple(value, key: str, path: Path, *, whole: bool = False) -> list[float] | None:
    """``None`` for an absent key, else three positive numbers, with ``whole`` whole numbers (a voxel
    count; ``12.0`` passes, ``10.5`` does not), or a one-line error naming the key."""
    if value is None:
        return None
    ok = isinstance(value, list) and len(value) == 3 and all(
        finite_number(v) and v > 0 and (not whole or v == int(v)) for v in value)
    if not ok:
        what = "whole numbers >= 1 (voxels)" if whole else "finite numbers"
        raise InputError(f"{key}: expected three positive {what} (z, y, x), got {value!r}", path)
    return value
