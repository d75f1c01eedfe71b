"""k-nearest-neighbour graphs in plain torch (no torch-cluster needed).

Graphs are PyG ``edge_index`` tensors ``(2, E)``: row 0 the neighbour (source ``j``),
row 1 the centre (target ``i``), so messages flow ``j -> i``.
"""

from __future__ import annotations

import operator

import torch

from cyclereg.frames import LOW_PRECISION, floating_dtype, require_finite, require_tensor

KNN_CHUNK_BYTES_CPU = 2**20
"""On CPU, the bytes of distance matrix computed and searched at once: a piece that stays in
the cache. Against 4096 rows at once this made the 10-NN graph of a COPD moving cloud (2569-3569
points) 20-30 % faster on a 2-core EPYC (one thread), the same indices."""

KNN_CHUNK_ROWS = 4096
"""On other devices (GPU), the query rows computed at once (memory: rows x M distances)."""


def knn_chunk_rows(n_reference: int, element_size: int, device: torch.device) -> int:
    """Query rows per piece of :func:`knn_indices` for ``n_reference`` points of ``element_size`` bytes."""
    if device.type == "cpu":
        return max(1, KNN_CHUNK_BYTES_CPU // (element_size * max(n_reference, 1)))
    return KNN_CHUNK_ROWS


def _count(k, minimum: int) -> int:
    """``k`` as an int (an int, numpy or torch integer; not ``True`` or ``2.0``) of at least ``minimum``,
    else :class:`ValueError` naming ``k``."""
    try:
        count = minimum - 1 if isinstance(k, bool) else operator.index(k)
    except TypeError:
        count = minimum - 1
    if count < minimum:
        raise ValueError(f"k: expected a whole number >= {minimum}, got {k!r}")
    return count


def knn_indices(query: torch.Tensor, reference: torch.Tensor, k: int, *, exclude_self: bool = False) -> torch.Tensor:
    """Indices ``(N, k)`` of the ``k`` nearest ``reference`` points ``(M, 3)`` of each ``query`` point ``(N, 3)``.

    Sorted by increasing distance. With ``exclude_self`` (query is reference: the same points in the
    same order), the point itself is skipped. Ties are broken by index order of :func:`torch.topk`.
    Points of any dimension D work alike (``(N, D)``, ``(M, D)``); both of one dtype (integer points are
    searched in torch's default float dtype, :func:`cyclereg.frames.floating_dtype`; float16 / bfloat16 points
    in float32, :data:`cyclereg.frames.LOW_PRECISION`). An empty query gives ``(0, k)``. :class:`ValueError`
    naming the argument otherwise (also for NaN or inf coordinates, which have no nearest neighbours).
    """
    return _knn_indices(query, reference, k, exclude_self, ("query", "reference"))


def _knn_indices(query: torch.Tensor, reference: torch.Tensor, k: int, exclude_self: bool,
                 names: tuple[str, str]) -> torch.Tensor:
    """:func:`knn_indices`, its errors naming the arguments ``names`` (query, reference)."""
    require_tensor(names[0], query)
    require_tensor(names[1], reference)
    if query.ndim != 2 or reference.ndim != 2 or query.shape[1] != reference.shape[1]:
        raise ValueError(f"query {tuple(query.shape)} / reference {tuple(reference.shape)}: expected (N, D), (M, D)")
    if query.dtype != reference.dtype:
        raise ValueError(f"query: {query.dtype}, but reference: {reference.dtype}; give both alike")
    require_finite(names[0], query, "coordinates")  # topk would rank NaN anyhow
    if reference is not query:
        require_finite(names[1], reference, "coordinates")
    if not query.is_floating_point():  # integer (voxel-index) points: searched in the default float dtype
        query, reference = query.to(floating_dtype(query)), reference.to(floating_dtype(reference))
    elif query.dtype in LOW_PRECISION:  # half-precision points: searched in float32 (no CPU cdist for them)
        query, reference = query.float(), reference.float()
    k = _count(k, 0)
    if exclude_self and query.shape != reference.shape:
        raise ValueError(f"exclude_self: the query must be the reference itself, got {tuple(query.shape)} "
                         f"and {tuple(reference.shape)}")
    kk = k + int(exclude_self)
    if kk > reference.shape[0]:
        raise ValueError(f"k={k}" + (" and the point itself (excluded)" if exclude_self else "") +
                         f": needs {kk} points, reference has only {reference.shape[0]}")
    if query.shape[0] == 0:
        return torch.zeros(0, k, dtype=torch.long, device=query.device)
    offset = reference.mean(dim=0) if reference.shape[0] else None
    if offset is not None and offset.abs().max() <= (reference - offset).abs().max():  # the origin is inside the cloud
        # but maybe beside its bulk only through a stray point (a cluster 1e4 mm away and one landmark written as
        # zeros): then the bulk's robust centre, the per-axis median, lies more than twice the points' median
        # distance from it (per axis) away from the origin
        centre = reference.median(dim=0).values
        offset = centre if centre.abs().max() > 2 * (reference - centre).abs().median(dim=0).values.max() else None
    if offset is not None:  # the origin is outside the cloud (or its bulk)
        # shift it in (torch.cdist's |x|^2 + |y|^2 - 2xy loses the distances far from the origin: float32 points 1e4 mm away
        # got most neighbours wrong); the pipeline's unit-frame clouds lie around the origin and are left as given
        query, reference = query - offset, reference - offset
    out = []
    piece = knn_chunk_rows(reference.shape[0], reference.element_size(), reference.device)
    for start in range(0, query.shape[0], piece):
        q = query[start:start + piece]
        d = torch.cdist(q, reference)
        if exclude_self:
            rows = torch.arange(q.shape[0], device=q.device)
            d[rows, rows + start] = float("inf")
        out.append(d.topk(k, dim=1, largest=False).indices)
    return torch.cat(out)


def knn_edge_index(points: torch.Tensor, k: int, *, include_self: bool = True) -> torch.Tensor:
    """Directed kNN graph ``(2, N*k)`` of a cloud ``(N, 3)``: edges ``j -> i`` for the k nearest ``j`` of ``i``
    (with ``include_self``, ``i`` itself is one of them: ``k >= 1``)."""
    k = _count(k, int(include_self))
    if include_self and k > points.shape[0]:  # named as given, not as the k - 1 others searched for
        raise ValueError(f"k={k}: the cloud has only {points.shape[0]} points")
    idx = _knn_indices(points, points, k - int(include_self), True, ("points", "points"))
    n = points.shape[0]
    centres = torch.arange(n, device=points.device)
    if include_self:
        idx = torch.cat([centres[:, None], idx], dim=1)
    kk = idx.shape[1]
    return torch.stack([idx.reshape(-1), centres.repeat_interleave(kk)])


def symmetric_edge_index(points: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Undirected kNN graph (union of both directions, no self loops) for message passing.

    Returns:
        edge_index: ``(2, E)`` with every undirected edge present in both directions.
        reverse: ``(E,)`` index of the opposite edge of each edge.
    """
    n = points.shape[0]
    idx = _knn_indices(points, points, k, True, ("points", "points"))
    src = idx.reshape(-1)
    dst = torch.arange(n, device=points.device).repeat_interleave(k)
    key = torch.cat([src * n + dst, dst * n + src]).unique()
    src, dst = key // n, key % n
    # key is sorted, so the reverse edge (dst, src) can be found by binary search
    reverse = torch.searchsorted(key, dst * n + src)
    return torch.stack([src, dst]), reverse
