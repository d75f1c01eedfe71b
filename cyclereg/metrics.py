"""Evaluation metrics: TRE statistics, Jacobian-based smoothness (SDlogJ), folding.

Dense fields follow the package convention: ``(B, 3, D, H, W)`` voxel displacements,
fixed -> moving.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from cyclereg.frames import LOW_PRECISION, check_displacement, floating_dtype, require_finite, require_tensor


def tre_stats(errors_mm: torch.Tensor) -> dict[str, float]:
    """Mean, std and 25/50/75th percentiles of per-landmark errors ``(N,)`` in mm (N >= 1, finite distances
    >= 0: :class:`ValueError` naming ``errors_mm`` otherwise; residual vectors ``(N, 3)`` are refused, not
    flattened, take their norms first)."""
    require_tensor("errors_mm", errors_mm)
    if errors_mm.ndim != 1 or errors_mm.numel() == 0:
        raise ValueError(f"errors_mm: expected (N,) distances with N >= 1, got {tuple(errors_mm.shape)}")
    if not torch.isfinite(errors_mm).all():
        raise ValueError("errors_mm: holds NaN or inf")
    if bool((errors_mm < 0).any()):  # a signed difference, not a distance: its mean would pass for a TRE
        raise ValueError(f"errors_mm: holds negative values (e.g. {errors_mm.min().item():g}); expected distances >= 0")
    e = errors_mm.double()
    q = torch.quantile(e, torch.tensor([0.25, 0.5, 0.75], dtype=e.dtype, device=e.device))
    return {"mean": e.mean().item(), "std": e.std(unbiased=True).item() if e.numel() > 1 else 0.0,
            "p25": q[0].item(), "p50": q[1].item(), "p75": q[2].item()}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two ``(N,)`` samples (Pearson correlation of their ranks; equal
    values share the mean of the ranks they span, as in the textbook definition and SciPy's ``spearmanr``).
    NaN when either sample is constant, holds NaN, or ``N < 2``."""
    require_tensor("a", a)
    require_tensor("b", b)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a {tuple(a.shape)}, b {tuple(b.shape)}: expected two (N,) tensors")
    if bool(a.isnan().any()) or bool(b.isnan().any()):  # argsort would rank NaN last, as the largest value
        return float("nan")
    if a.numel() < 2 or a.unique().numel() < 2 or b.unique().numel() < 2:
        return float("nan")
    ra, rb = (r - r.mean() for r in (_mean_ranks(a), _mean_ranks(b)))
    return float((ra * rb).sum() / (ra.pow(2).sum() * rb.pow(2).sum()).sqrt())


def _mean_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks ``0 .. N-1`` of the values of ``(N,)`` ``x`` in float64, equal values sharing the mean of theirs."""
    _, inverse, counts = torch.unique(x.double(), return_inverse=True, return_counts=True)
    counts = counts.double()
    first = counts.cumsum(0) - counts  # the rank of each distinct value's first occurrence in sorted order
    return (first + (counts - 1) / 2)[inverse]


JACOBIAN_SLAB = 16
"""Planes along the first axis computed at once by :func:`jacobian_determinant` (bounds its
double-precision temporaries; the result is the same for any value)."""


def jacobian_determinant(disp_vox: torch.Tensor, *, slab: int = JACOBIAN_SLAB) -> torch.Tensor:
    """Determinant of the Jacobian of ``x -> x + u(x)``, central differences.

    Args:
        disp_vox: ``(B, 3, D, H, W)`` displacement in voxels (channel c along axis c); the
            determinant of a voxel field does not depend on the spacing. A field in mm goes
            through :func:`cyclereg.frames.mm_disp_to_voxel` first.
        slab: output planes along D computed at once, in float64 (memory: about 20 slab-sized
            float64 temporaries instead of 20 volume-sized ones; bitwise the same result).
    Returns:
        ``(B, D-2, H-2, W-2)`` determinants in :func:`~cyclereg.frames.floating_dtype` of the input (its
        own dtype when floating; the one-voxel border is dropped).
    """
    check_displacement("disp_vox", disp_vox)
    if isinstance(slab, bool) or not isinstance(slab, numbers.Integral) or slab < 1:
        raise ValueError(f"slab={slab!r}: need a whole number of planes, at least 1")
    b, _, depth, height, width = disp_vox.shape
    out = disp_vox.new_empty(b, max(depth - 2, 0), max(height - 2, 0), max(width - 2, 0),
                             dtype=floating_dtype(disp_vox))
    for start in range(0, out.shape[1], slab):
        stop = min(start + slab, out.shape[1])
        # output planes start..stop-1 are input planes start+1..stop, which need start..stop+1
        out[:, start:stop] = _determinant_interior(disp_vox[:, :, start:stop + 2].double())
    return out


def _determinant_interior(u: torch.Tensor) -> torch.Tensor:
    """:func:`jacobian_determinant` of one float64 piece ``(B, 3, d, H, W)`` -> ``(B, d-2, H-2, W-2)``."""
    interior = [slice(1, -1)] * 3

    def d(c: int, a: int) -> torch.Tensor:
        """Entry ``(c, a)`` of ``I + du/dx``: central difference of channel ``c`` along axis ``a``."""
        plus, minus = list(interior), list(interior)
        plus[a], minus[a] = slice(2, None), slice(None, -2)
        g = (u[(slice(None), c, *plus)] - u[(slice(None), c, *minus)]) / 2.0
        return g + 1.0 if a == c else g

    # cofactor expansion along the first row, elementwise over voxels (much faster than a batched
    # linalg.det of millions of 3x3 matrices, and no (..., 3, 3) copy)
    j = [[d(c, a) for a in range(3)] for c in range(3)]
    return (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
            - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
            + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))


JACOBIAN_MIN_SIZE = 3
"""A Jacobian map (central differences) needs this many voxels along every axis."""


def jacobian_map(disp_vox: torch.Tensor, *, slab: int = JACOBIAN_SLAB) -> torch.Tensor:
    """Jacobian determinant of ``x -> x + u(x)`` at every voxel of the grid, as a volume.

    Args:
        disp_vox: ``(1, 3, D, H, W)`` displacement in voxels (fixed -> moving), D, H, W >= 3.
        slab: planes per piece along the first axis (same result for any value).
    Returns:
        ``(D, H, W)`` float32 whatever the input's dtype (a map to write as a NIfTI volume; the
        exception to "dtypes follow the inputs"): :func:`jacobian_determinant` in the interior, each border voxel
        the value of its nearest interior voxel. ``J > 1``: the region around ``x`` corresponds
        to a larger region of the moving scan (for exhale fixed / inhale moving: local
        inspiration volume ratio); ``J <= 0``: folding.
    """
    if disp_vox.ndim != 5 or disp_vox.shape[:2] != (1, 3) or min(disp_vox.shape[2:]) < JACOBIAN_MIN_SIZE:
        raise ValueError(f"disp_vox: expected (1, 3, D, H, W) with D, H, W >= {JACOBIAN_MIN_SIZE}, "
                         f"got {tuple(disp_vox.shape)}")
    inner = jacobian_determinant(disp_vox, slab=slab)[0].float()
    return torch.nn.functional.pad(inner[None, None], (1, 1, 1, 1, 1, 1), mode="replicate")[0, 0]


L2R_JACOBIAN_OFFSET = 3.0
"""Learn2Reg's evaluation adds 3 to the Jacobian determinant before the log (kept as is)."""

SDLOGJ_MIN_SIZE = 5
"""Fewest voxels per axis of a field :func:`sdlogj` scores: the Learn2Reg formula leaves out the
two voxels at each border, so 5 leave one."""


def sdlogj(disp_vox: torch.Tensor) -> dict[str, float]:
    """Smoothness of a dense field ``(1, 3, D, H, W)`` (voxels), ``D, H, W >=`` :data:`SDLOGJ_MIN_SIZE`.

    Returns:
        ``sdlogj``: the Learn2Reg evaluation formula,
        ``std(log(clip(J + 3, 1e-9, 1e9)))`` over voxels at least 2 from the border (population
        standard deviation, as numpy's ``std`` in their evaluation);
        ``std_logj``: plain ``std(log J)`` over interior voxels with ``J > 0``;
        ``folding_fraction``: fraction of interior voxels with ``J <= 0``.

    A field holding NaN or inf is refused (:class:`ValueError` naming ``disp_vox``): its voxels would drop
    out of both ``J > 0`` and ``J <= 0``, so the last two figures came out as if they were not there.
    """
    check_displacement("disp_vox", disp_vox)
    if disp_vox.shape[0] != 1 or min(disp_vox.shape[2:]) < SDLOGJ_MIN_SIZE:
        raise ValueError(f"disp_vox: expected (1, 3, D, H, W) with D, H, W >= {SDLOGJ_MIN_SIZE} (one field; the "
                         f"Learn2Reg formula drops two voxels at each border), got {tuple(disp_vox.shape)}")
    require_finite("disp_vox", disp_vox, "values")
    return _determinant_stats(jacobian_determinant(disp_vox))


def determinant_stats(J: torch.Tensor) -> dict[str, float]:
    """:func:`sdlogj`'s figures from the interior determinants ``J`` ``(1, D-2, H-2, W-2)`` of one field, as
    :func:`jacobian_determinant` returns them (or the interior ``[1:-1, 1:-1, 1:-1]`` of a
    :func:`jacobian_map`, which holds the same values), so a caller that has the map need not
    compute the determinants again. NaN or inf determinants are refused (:class:`ValueError` naming ``J``)."""
    require_tensor("J", J)
    if J.ndim != 4 or J.shape[0] != 1 or min(J.shape[1:]) < SDLOGJ_MIN_SIZE - 2:
        raise ValueError(f"J: expected (1, D, H, W) with D, H, W >= {SDLOGJ_MIN_SIZE - 2} (the determinants of one "
                         f"field of at least {SDLOGJ_MIN_SIZE} voxels per axis), got {tuple(J.shape)}")
    require_finite("J", J, "values")
    return _determinant_stats(J)


def _determinant_stats(J: torch.Tensor) -> dict[str, float]:
    """:func:`determinant_stats` of determinants already checked (shape, finite)."""
    J = J.double()
    inner = J[:, 1:-1, 1:-1, 1:-1]
    l2r = torch.log((inner + L2R_JACOBIAN_OFFSET).clamp(1e-9, 1e9))
    pos = J[J > 0]
    return {
        "sdlogj": l2r.std(correction=0).item(),
        "std_logj": torch.log(pos).std().item() if pos.numel() > 1 else float("nan"),
        "folding_fraction": (J <= 0).double().mean().item(),
    }


# ----------------------------------------------------------------------------- label overlap (dense path)
MAX_COUNTED_LABEL = 1 << 20
"""Largest label value the one-pass label statistics index directly (:func:`label_counts`,
:func:`_label_boxes`); maps with larger values are compared label by label."""


def label_counts(labels: torch.Tensor) -> torch.Tensor | None:
    """Voxels per label value of an integer label map, ``(largest label + 1,)``, from one ``bincount``
    pass; ``None`` where the map is not integer, holds a negative value or one above
    :data:`MAX_COUNTED_LABEL` (then callers compare label by label)."""
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool or labels.numel() == 0:
        return None
    flat = labels.reshape(-1)
    if int(flat.min()) < 0 or int(flat.max()) > MAX_COUNTED_LABEL:
        return None
    return torch.bincount(flat)


def _present(counts: torch.Tensor | None, labels_map: torch.Tensor, label: int) -> bool:
    if counts is not None:
        return 0 <= label < counts.numel() and bool(counts[label] > 0)
    return bool((labels_map == label).any())


def _label_values(labels: torch.Tensor, counts: torch.Tensor | None = None) -> set[int]:
    """The label values a map holds: from its :func:`label_counts` (``counts`` if already made),
    else from ``torch.unique``."""
    counts = counts if counts is not None else label_counts(labels)
    return set(torch.nonzero(counts).flatten().tolist()) if counts is not None else set(torch.unique(labels).tolist())


def scored_labels(fixed_labels: torch.Tensor, moving_labels: torch.Tensor, fixed_counts: torch.Tensor | None = None,
                  moving_counts: torch.Tensor | None = None) -> list[int]:
    """The foreground labels a registration of ``moving`` to ``fixed`` is scored on: those present
    in both the fixed and the *unwarped* moving map (Learn2Reg). Decide them before warping and pass
    them to :func:`dice` / :func:`hd95`, so that a structure the registration erases still counts.
    ``fixed_counts`` / ``moving_counts``: the maps' :func:`label_counts` where a caller has them."""
    both = _label_values(fixed_labels, fixed_counts) & _label_values(moving_labels, moving_counts)
    return sorted(int(l) for l in both - {0})


def _labels_to_score(fixed_labels: torch.Tensor, warped_labels: torch.Tensor, labels,
                     fixed_counts: torch.Tensor | None = None, warped_counts: torch.Tensor | None = None) -> list[int]:
    """``labels`` (default: the foreground labels present in both maps) less those absent from the fixed map
    (:class:`ValueError` naming ``labels`` for a value that is no whole number: 1.5 is no label, and
    ``True`` is no number)
    (``*_counts``: the maps' :func:`label_counts` where the caller has them)."""
    if labels is None:
        return scored_labels(fixed_labels, warped_labels, fixed_counts, warped_counts)
    counts = fixed_counts if fixed_counts is not None else label_counts(fixed_labels)
    return [l for l in _whole_labels(labels) if _present(counts, fixed_labels, l)]


def _whole_labels(labels) -> list[int]:
    """``labels`` (ints, NumPy ints, integer tensors, or whole floats as JSON gives them) as Python ints."""
    out = []
    for value in labels:
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype == torch.bool:
            value = value.item()
        whole = (isinstance(value, numbers.Integral) or (isinstance(value, numbers.Real) and math.isfinite(value)
                                                         and float(value).is_integer()))
        if isinstance(value, (bool, np.bool_)) or not whole:
            raise ValueError(f"labels: {value!r} is no label (labels are whole numbers)")
        out.append(int(value))
    return out


def erased_labels(warped_labels: torch.Tensor, labels) -> list[int]:
    """Those of ``labels`` that ``warped_labels`` no longer holds (the registration removed them);
    :class:`ValueError` naming ``labels`` for a value that is no whole number, as :func:`dice`."""
    counts = label_counts(warped_labels)
    return [k for k in _whole_labels(labels) if not _present(counts, warped_labels, k)]


def check_label_maps(fixed_labels: torch.Tensor, warped_labels: torch.Tensor) -> None:
    """ValueError naming the argument unless both are label maps of one shape holding whole numbers
    (a float map with 1.5 in it would otherwise be scored as label 1, which it does not hold)."""
    if fixed_labels.shape != warped_labels.shape:
        raise ValueError(f"fixed_labels, warped_labels: shapes differ: {tuple(fixed_labels.shape)} vs "
                         f"{tuple(warped_labels.shape)}")
    for name, m in (("fixed_labels", fixed_labels), ("warped_labels", warped_labels)):
        if m.dtype.is_complex or (m.dtype.is_floating_point and not bool((m == m.round()).all())):
            raise ValueError(f"{name}: a label map holds whole numbers; got {m.dtype} values that are not")


def dice(fixed_labels: torch.Tensor, warped_labels: torch.Tensor, labels=None) -> dict[int, float]:
    """Dice overlap per label of two integer label maps on one grid.

    Args:
        fixed_labels, warped_labels: integer maps of equal shape (0 = background).
        labels: labels to score, normally :func:`scored_labels` of the fixed and the unwarped
            moving map; a listed label absent from ``warped_labels`` scores 0 (the registration
            erased it) and one absent from ``fixed_labels`` is left out, as in Learn2Reg's
            evaluation. Default: the foreground labels present in both maps.
    Returns:
        ``{label: dice}``. Counted for all labels at once (:func:`label_counts` of both maps and of
        the voxels where they agree: three passes over the volume, not three per label); maps with
        negative labels are compared label by label, with the same result.
    """
    check_label_maps(fixed_labels, warped_labels)
    ca, cb = label_counts(fixed_labels), label_counts(warped_labels)
    out = {}
    if ca is not None and cb is not None:
        size = max(ca.numel(), cb.numel())
        ca, cb = (torch.nn.functional.pad(c, (0, size - c.numel())) for c in (ca, cb))
        both = torch.bincount(fixed_labels[fixed_labels == warped_labels].reshape(-1), minlength=size)
        for lab in _labels_to_score(fixed_labels, warped_labels, labels, ca, cb):
            out[int(lab)] = 2.0 * int(both[lab]) / (int(ca[lab]) + int(cb[lab]))
        return out
    for lab in _labels_to_score(fixed_labels, warped_labels, labels):
        a = fixed_labels == lab
        b = warped_labels == lab
        inter = (a & b).sum().item()
        out[int(lab)] = 2.0 * inter / (a.sum().item() + b.sum().item())
    return out


def _surface(mask):
    from scipy import ndimage

    er = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)
    return mask & ~er if mask.any() else np.zeros_like(mask)


def _label_boxes(labels):
    """``scipy.ndimage.find_objects`` of a non-negative integer label map (numpy): per label value
    ``v >= 1`` the slices of its bounding box at index ``v - 1`` (None where absent), in one pass;
    ``None`` for other maps (then :func:`_union_box` searches label by label)."""
    from scipy import ndimage

    if (labels.size == 0 or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0
            or labels.max() > MAX_COUNTED_LABEL):
        return None
    return ndimage.find_objects(labels.astype(np.intp, copy=False))


def _union_box(lab: int, boxes, maps):
    """``(first, last)`` voxel indices ``(3,)`` of the box around label ``lab`` in both ``maps``,
    ``None`` when the second map (the warped one) lacks it; ``boxes``: their :func:`_label_boxes`."""

    ends = []
    for found, m in zip(boxes, maps):
        if found is not None and lab >= 1:  # find_objects leaves out the background
            sl = found[lab - 1] if 1 <= lab <= len(found) else None
            ends.append(None if sl is None else (np.array([s.start for s in sl]), np.array([s.stop - 1 for s in sl])))
        else:
            idx = np.argwhere(m == lab)
            ends.append((idx.min(0), idx.max(0)) if len(idx) else None)
    if ends[1] is None:
        return None
    present = [e for e in ends if e is not None]
    return np.min([e[0] for e in present], axis=0), np.max([e[1] for e in present], axis=0)


ORTHOGONAL_AXES_TOLERANCE = 1e-9
"""A voxel -> mm linear map whose columns' dot products are below this (relative to the largest squared
column) has orthogonal axes: :func:`hd95` measures it with the column lengths alone."""


def _voxel_metric(spacing) -> tuple[np.ndarray, np.ndarray | None]:
    """``(voxel sizes (3,), None)`` for three voxel sizes [mm] or a (3, 3) voxel -> mm linear map with orthogonal
    axes (a rotation or flip of a scaled grid: lengths are its column lengths); ``(column lengths, the map)``
    for a map with shear, whose lengths need the whole map. :class:`ValueError` naming ``spacing`` otherwise (also
    for text, ``("1", "2", "3")`` included, and truth values: no sizes)."""
    try:
        given = np.asarray(spacing)
    except (TypeError, ValueError):  # a ragged list
        given = None
    if (given is None or given.dtype.kind not in "iuf"
            or (isinstance(spacing, (list, tuple)) and any(isinstance(v, (bool, np.bool_)) for v in spacing))):
        raise ValueError(f"spacing={spacing!r}: expected three positive voxel sizes [mm] or a (3, 3) voxel -> mm map")
    scale = given.astype(np.float64)
    if scale.shape == (3, 3):
        if not np.isfinite(scale).all() or np.linalg.svd(scale, compute_uv=False).min() <= 0:
            raise ValueError("spacing: expected a finite, invertible (3, 3) voxel -> mm map")
        sizes = np.sqrt((scale ** 2).sum(0))  # as Volume.spacing computes them
        gram = scale.T @ scale
        sheared = np.abs(gram - np.diag(np.diag(gram))).max() > ORTHOGONAL_AXES_TOLERANCE * gram.diagonal().max()
        return sizes, (scale if sheared else None)
    if scale.shape != (3,) or not (np.isfinite(scale).all() and (scale > 0).all()):
        given = tuple(float(x) for x in np.ravel(scale))  # the numbers, not NumPy scalars' reprs
        raise ValueError(f"spacing={given}: expected three positive voxel sizes [mm] or a (3, 3) voxel -> mm map")
    return scale, None


def hd95(fixed_labels: torch.Tensor, warped_labels: torch.Tensor, spacing=(1.0, 1.0, 1.0), labels=None,
         percentile: float = 95.0) -> dict[int, float]:
    """Robust (95th percentile) symmetric Hausdorff distance per label, in mm.

    Surfaces are the mask voxels with a 6-neighbour outside the mask; the distance from
    each surface voxel of one map to the nearest surface voxel of the other map is Euclidean at
    ``spacing`` (mm along i, j, k, or the grid's (3, 3) voxel -> mm linear map, e.g. ``affine[:3, :3]``,
    which measures a sheared grid in world mm; exact nearest neighbours from a k-d tree, the values a
    distance transform gives); the result is the larger of the two directed 95th percentiles.
    Each label is worked on inside the bounding box of both maps' voxels of it (found for all
    labels in one pass). ``labels`` as for :func:`dice`, except that a label absent
    from ``warped_labels`` has no surface to measure and is left out (Dice scores it 0).
    """
    from scipy.spatial import cKDTree

    check_label_maps(fixed_labels, warped_labels)
    # (D, H, W), or with leading singleton axes as the package's (B, C, D, H, W) maps for one pair
    if fixed_labels.ndim < 3 or any(n != 1 for n in fixed_labels.shape[:-3]):
        raise ValueError(f"fixed_labels: expected (D, H, W) or (1, 1, D, H, W), got {tuple(fixed_labels.shape)}")
    grid = fixed_labels.shape[-3:]
    fixed_labels, warped_labels = fixed_labels.reshape(grid), warped_labels.reshape(grid)
    scale, linear = _voxel_metric(spacing)
    # NumPy has no bfloat16 (and a map may carry an autograd graph): whole-number values survive float32
    fa, wa = (t.detach().cpu().to(torch.float32 if t.dtype in LOW_PRECISION else t.dtype).numpy()
              for t in (fixed_labels, warped_labels))
    boxes = _label_boxes(fa), _label_boxes(wa)
    out = {}
    for lab in _labels_to_score(fixed_labels, warped_labels, labels):
        box = _union_box(lab, boxes, (fa, wa))
        if box is None:  # absent from the warped map
            continue
        lo = np.maximum(box[0] - 2, 0)
        hi = box[1] + 3
        sl = tuple(slice(l, h) for l, h in zip(lo, hi))
        a, b = fa[sl] == lab, wa[sl] == lab
        # surface voxels in mm; each one's distance to the nearest surface voxel of the other map
        pa, pb = ((np.argwhere(_surface(m)) * scale) if linear is None else np.argwhere(_surface(m)) @ linear.T
                  for m in (a, b))
        a_to_b, _ = cKDTree(pb).query(pa)
        b_to_a, _ = cKDTree(pa).query(pb)
        out[int(lab)] = float(max(np.percentile(a_to_b, percentile), np.percentile(b_to_a, percentile)))
    return out
