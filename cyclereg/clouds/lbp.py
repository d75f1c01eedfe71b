"""Sparse loopy belief propagation over a kNN graph of the fixed cloud (min-sum), with a
soft-argmin read-out so that the prediction is differentiable in the features.

Each fixed point ``i`` gets ``K`` candidate displacements ``c_i(l) = m_{n_l(i)} - f_i``
towards its ``K`` nearest moving points. Energy (unit frame):

    E(l) = sum_i D_i(l_i) + alpha * sum_{(i,j)} ||c_i(l_i) - c_j(l_j)||^2,

with the data cost ``D_i(l)`` = mean squared difference of fixed and moving features.
The read-out is ``u_i = sum_l softmax(-beta * b_i)_l c_i(l)`` with beliefs ``b_i``
(min-marginals on a tree).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cyclereg.clouds import native
from cyclereg.clouds.knn import knn_indices, symmetric_edge_index
from cyclereg.errors import finite_number, whole_number
from cyclereg.frames import LOW_PRECISION, check_cloud, require_tensor, working_dtype

EDGE_CHUNK = 512
"""Edges processed at once in the min-convolution off the CPU (memory: chunk x K x K floats)."""

CPU_CHUNK_PRODUCTS = 2 ** 22
"""On CPU, the min-convolution takes as many edges at once as keep its ``edges x K x K'`` product
near this many floats (16 MB), at most :data:`EDGE_CHUNK`: the product is written and then reduced,
and a chunk that stays in cache (and is not a fresh 134 MB allocation each time) makes both faster.
The messages are bitwise the same for any chunk size; timings in docs/benchmarks.md."""


def edge_chunk(k_src: int, k_dst: int, device: torch.device) -> int:
    """Edges per min-convolution chunk for ``k_src`` source and ``k_dst`` destination labels."""
    if device.type != "cpu":
        return EDGE_CHUNK
    return max(1, min(EDGE_CHUNK, CPU_CHUNK_PRODUCTS // max(1, k_src * k_dst)))


@dataclass(frozen=True)
class LBPConfig:
    """Sparse LBP settings (unit frame). Defaults follow the authors' COPD code except
    ``iterations`` (5 effective sweeps here; the authors' loop keeps 4, see below) and
    ``num_candidates``: they draw 256 candidates from a moving cloud resampled to 8192
    points; on the ~3k-point clouds used here 64 candidates cover the same motion range
    at 1/16 of the message-passing cost (see docs/benchmarks.md for 64/128/256).

    Attributes:
        num_candidates: candidate displacements per fixed point (nearest moving points), K.
        graph_k: neighbours per point of the (symmetrised) kNN graph of the fixed cloud.
        iterations: min-sum message passing sweeps; the beliefs hold the messages of all of them.
            (The authors' ``lbps_iter = 5`` keeps 4: their loop makes a 5th update and drops it,
            so their test settings are 4 here; docs/benchmarks.md.)
        pairwise_weight: alpha, weight of the squared displacement difference
            (unit-frame coordinates, i.e. per half box extent).
        data_weight: multiplies the feature dissimilarity (mean squared difference of the
            features, dimensionless), so the unary costs are dimensionless like the beliefs.
        softmax_beta: inverse temperature of the soft-argmin read-out (per unit of belief,
            dimensionless; larger = closer to the hard minimum).
        source_labels: if set, each message only searches this many lowest-belief source
            labels (faster, approximate); None searches all K (exact min-sum).
        prune_from: on CPU, messages with at least this many source labels search exactly
            but in two steps (:func:`min_convolution`): first the ``prune_fraction`` lowest-belief
            source labels, then all K only for the destination labels whose minimum that cannot
            certify. Same messages, fewer products where beliefs are peaked; below ~128 labels
            the single full search is faster on CPU (docs/benchmarks.md). None: never.
        prune_fraction: share of the source labels searched first when pruning.
    """

    num_candidates: int = 64
    graph_k: int = 10
    iterations: int = 5
    pairwise_weight: float = 10.0
    data_weight: float = 1.0
    softmax_beta: float = 50.0
    source_labels: int | None = None
    prune_from: int | None = 128
    prune_fraction: float = 0.25

    def __post_init__(self):
        for name, minimum in (("num_candidates", 1), ("graph_k", 1), ("iterations", 0)):
            value = getattr(self, name)
            if not whole_number(value) or value < minimum:
                raise ValueError(f"{name}={value!r}: need a whole number, at least {minimum}")
        for name in ("pairwise_weight", "data_weight", "softmax_beta"):
            if not finite_number(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r}: need a finite number")
        if self.source_labels is not None and not (whole_number(self.source_labels) and self.source_labels >= 1):
            raise ValueError(f"source_labels={self.source_labels!r}: need a whole number, at least 1 (None = all)")
        if self.prune_from is not None and not (whole_number(self.prune_from) and self.prune_from >= 1):
            raise ValueError(f"prune_from={self.prune_from!r}: need a whole number of source labels, at least 1 "
                             "(None = never prune)")
        if not (0 < self.prune_fraction < 1):
            raise ValueError(f"prune_fraction={self.prune_fraction}: need 0 < fraction < 1")


def take_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[idx]`` for an integer index tensor of any shape: ``(*idx.shape, *x.shape[1:])``.

    Through ``index_select``, whose backward (``index_add``) is deterministic on CPU with several
    threads; the backward of advanced indexing (``index_put_`` with accumulation) is not, and made
    two runs of the same training differ in the last bits, then by a few hundredths of a mm."""
    return x.index_select(0, idx.reshape(-1)).reshape(*idx.shape, *x.shape[1:])


def candidate_count(k: int, n_moving: int) -> int:
    """Candidates per fixed point for ``k`` asked and a moving cloud of ``n_moving`` points."""
    return min(k, n_moving)


def candidates(fixed: torch.Tensor, moving: torch.Tensor, k: int,
               centres: torch.Tensor | None = None, *, idx: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate displacements ``(N, K, 3)`` from each fixed point to ``K`` moving points, and
    the moving indices ``(N, K)``.

    The ``K`` moving points are the nearest ones to ``centres`` ``(N, 3)`` (same frame as the
    clouds; default: the fixed points themselves). Displacements are always measured from the
    fixed point, so a search re-centred at ``fixed + u0`` still yields total displacements.
    ``idx``: those moving indices ``(N, K)`` if already known (the search is then skipped).
    """
    k = candidate_count(k, moving.shape[0])
    if centres is not None:
        require_tensor("centres", centres)
        if centres.shape != fixed.shape:
            raise ValueError(f"centres {tuple(centres.shape)}: expected {tuple(fixed.shape)} like fixed")
        if (centres.dtype, centres.device) != (fixed.dtype, fixed.device):
            raise ValueError(f"centres: {centres.dtype} on {centres.device}, but fixed: {fixed.dtype} on "
                             f"{fixed.device}; give them alike")
    if idx is None:
        idx = knn_indices(fixed if centres is None else centres, moving, k)
    elif idx.shape != (fixed.shape[0], k):
        raise ValueError(f"idx {tuple(idx.shape)}: expected {(fixed.shape[0], k)} (fixed points x candidates)")
    return take_rows(moving, idx) - fixed[:, None, :], idx


def feature_cost(feat_fixed: torch.Tensor, feat_moving: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Mean squared feature difference ``(N, K)`` between fixed point ``i`` and moving point ``idx[i, l]``."""
    return (feat_fixed[:, None, :] - take_rows(feat_moving, idx)).pow(2).mean(-1)


def _argmin_chunk(belief_src, cand_src, cand_dst, alpha):
    """Index of the minimising source label for every destination label, ``(e, K')``.

    Uses ``b(l) + a||x_l - y||^2 = [x_l, b(l) + a||x_l||^2] . [-2a y, 1] + a||y||^2``: one
    batched matrix product with inner dimension 4, then a minimum over the source labels. The
    product is laid out ``(e, K', K)`` and reduced over its last dim with ``min``: with cache-sized
    chunks (:func:`edge_chunk`) 5-15 % faster on CPU than the ``(e, K, K')`` layout reduced over
    dim 1 (which was the faster one with 512-edge chunks), bitwise the same indices on COPD.
    """
    return torch.bmm(_destination_rows(cand_dst, alpha),
                     _source_rows(belief_src, cand_src, alpha).transpose(1, 2)).min(dim=2).indices


def _source_rows(belief_src, cand_src, alpha):
    """``[x_l, b(l) + a||x_l||^2]`` per source label, ``(e, K, 4)`` (see :func:`_argmin_chunk`)."""
    return torch.cat([cand_src, (belief_src + native.source_term(cand_src, alpha))[..., None]], dim=-1)


def _destination_rows(cand_dst, alpha):
    """``[-2a y, 1]`` per destination label, ``(e, K', 4)`` (see :func:`_argmin_chunk`)."""
    return torch.cat([-2.0 * alpha * cand_dst, torch.ones_like(cand_dst[..., :1])], dim=-1)


def _argmin_pruned_chunk(belief_src, cand_src, cand_dst, alpha, first):
    """:func:`_argmin_chunk` (the same indices, up to exact ties) in two steps: the ``first``
    lowest-belief source labels, then all of them for the edges that need it.

    Every other source label ``l`` costs at least ``b(l) >= b_(first+1)`` (the pairwise term is
    non-negative), so a destination label whose best value among the first ones is below
    ``b_(first+1)`` has its exact minimum. An edge with any destination label that bound cannot
    certify is searched again over all labels (one batched product for all such edges): with flat
    beliefs (the first sweeps) that is nearly every edge, and the search costs one full product
    plus the quarter; searching only the uncertified labels one by one had cost up to 3x a full one.
    """
    vals, order = belief_src.topk(first + 1, dim=1, largest=False)  # ascending
    keep, bound = order[:, :first], vals[:, first]
    rhs = _destination_rows(cand_dst, alpha)
    lhs = _source_rows(vals[:, :first], cand_src.gather(1, keep[..., None].expand(-1, -1, 3)), alpha)
    best, at = torch.bmm(rhs, lhs.transpose(1, 2)).min(dim=2)
    arg = keep.gather(1, at)
    best = best + alpha * cand_dst.pow(2).sum(-1)
    # rounding margin: a near-tie with the bound is searched again rather than trusted
    redo = best >= bound[:, None] - 1e-6 * (1 + bound.abs()[:, None])
    edges = redo.any(dim=1).nonzero().squeeze(1)
    if edges.numel():
        full = torch.bmm(rhs[edges], _source_rows(belief_src[edges], cand_src[edges], alpha).transpose(1, 2))
        arg[edges] = torch.where(redo[edges], full.min(dim=2).indices, arg[edges])
    return arg


def min_convolution(belief_src: torch.Tensor, cand_src: torch.Tensor, cand_dst: torch.Tensor,
                    alpha: float, *, source_labels: int | None = None, prune_from: int | None = None,
                    prune_fraction: float = 0.25, src_ax2: torch.Tensor | None = None) -> torch.Tensor:
    """``m(l') = min_l [ belief_src(l) + alpha * ||cand_src(l) - cand_dst(l')||^2 ]`` per edge.

    Shapes: ``belief_src (E, K)``, ``cand_src (E, K, 3)``, ``cand_dst (E, K', 3)`` -> ``(E, K')``.
    The arg-min search runs without autograd; the value is recomputed at the arg-min so
    gradients flow exactly as through a hard ``min`` while memory stays ``O(E K)``.
    ``source_labels`` (optional) restricts the search to the L lowest-belief source labels
    per edge (an approximation that trades exactness for speed). ``prune_from`` (optional, CPU
    only): with at least that many source labels, search exactly in two steps
    (:func:`_argmin_pruned_chunk`, the first ``prune_fraction`` of the labels first).
    On CPU the search runs in the C kernel of :mod:`cyclereg.clouds.native` when it is available
    (the same indices, several times faster); ``src_ax2`` is its :func:`native.source_term` of
    ``cand_src``, if the caller keeps it across sweeps. Half-precision inputs
    (:data:`cyclereg.frames.LOW_PRECISION`) are searched in float32; the value at the arg-min is in their dtype.
    """
    with torch.no_grad():
        b, cs, dst = belief_src.detach(), cand_src.detach(), cand_dst.detach()
        keep = None
        use_native = native.usable(b) and cs.dtype == cand_dst.dtype == torch.float32
        # half precision to float32 (the expansion's terms are ~10x the minimum); other dtypes as they are
        b, cs, dst = (x.to(working_dtype(x)) for x in (b, cs, dst))
        if use_native and (src_ax2 is None or src_ax2.dtype != torch.float32):  # a cache only: made again
            src_ax2 = native.source_term(cs, alpha)
        if source_labels is not None and source_labels < b.shape[1]:
            keep = b.topk(source_labels, dim=1, largest=False).indices
            b = b.gather(1, keep)
            cs = cs.gather(1, keep[..., None].expand(-1, -1, 3))
            if use_native:
                src_ax2 = src_ax2.gather(1, keep)
        first = native.prune_first(b.shape[1], prune_from, prune_fraction) if b.device.type == "cpu" else 0
        if not alpha > 0:  # the pruning bound needs a non-negative pairwise term (as the C kernels have it)
            first = 0
        prune = first > 0
        if use_native:
            # the pairwise term at the arg-min comes with it unless coordinates carry gradients
            with_pair = not (cand_src.requires_grad or cand_dst.requires_grad)
            arg, pair = native.search(b, cs, dst, alpha, first if prune else 0, src_ax2, with_pair)
        else:
            pair = None
            if prune:
                search = lambda b_, c_, d_: _argmin_pruned_chunk(b_, c_, d_, alpha, first)  # noqa: E731
            else:
                search = lambda b_, c_, d_: _argmin_chunk(b_, c_, d_, alpha)  # noqa: E731
            step = edge_chunk(b.shape[1], cand_dst.shape[1], b.device)
            arg = torch.cat([search(b[s:s + step], cs[s:s + step], dst[s:s + step])
                             for s in range(0, b.shape[0], step)])
        if keep is not None:
            arg = keep.gather(1, arg)
    best_b = belief_src.gather(1, arg)
    if pair is not None:  # the kernel's pairwise term: the same floats as the line below
        return best_b + pair
    best_c = cand_src.gather(1, arg[..., None].expand(-1, -1, 3))
    return best_b + alpha * (best_c - cand_dst).pow(2).sum(-1)


def min_sum(unary: torch.Tensor, cand: torch.Tensor, edge_index: torch.Tensor, reverse: torch.Tensor,
            alpha: float, iterations: int, *, source_labels: int | None = None, prune_from: int | None = None,
            prune_fraction: float = 0.25, fused: bool = True) -> torch.Tensor:
    """Loopy min-sum message passing; returns beliefs ``(N, K)`` (min-marginals on a tree).

    Args:
        unary: ``(N, K)`` data costs.
        cand: ``(N, K, 3)`` candidate labels (displacements) per node.
        edge_index: ``(2, E)`` directed edges src -> dst, each undirected edge in both directions.
        reverse: ``(E,)`` index of the opposite edge.
        fused: on CPU, run all sweeps (and their backward pass) in the C kernel of
            :func:`cyclereg.clouds.native.min_sum` where it applies (exact search, coordinates
            without gradient): bitwise the same beliefs, the gradient to float rounding, without
            the per-sweep tensor steps below. False: always these steps.
    """
    if fused and source_labels is None and native.sweeps_usable(unary, cand):  # checks the graph itself
        return native.min_sum(unary, cand, edge_index, reverse, alpha, iterations,
                              native.prune_first(unary.shape[1], prune_from, prune_fraction))
    native.require_graph(unary, cand, edge_index, reverse)
    src, dst = edge_index
    n, k = unary.shape
    messages = unary.new_zeros(edge_index.shape[1], k)
    cand_src, cand_dst = take_rows(cand, src), take_rows(cand, dst)
    src_ax2 = native.source_term(cand_src.detach(), alpha) if native.usable(unary.detach()) else None
    for _ in range(iterations):
        incoming = unary.new_zeros(n, k).index_add(0, dst, messages)
        # belief at the source without what the destination sent to it
        b_src = take_rows(unary + incoming, src) - take_rows(messages, reverse)
        messages = min_convolution(b_src, cand_src, cand_dst, alpha, source_labels=source_labels,
                                   prune_from=prune_from, prune_fraction=prune_fraction, src_ax2=src_ax2)
        # normalise for numerical range (min-sum is invariant to per-message constants)
        messages = messages - messages.amin(dim=1, keepdim=True)
    incoming = unary.new_zeros(n, k).index_add(0, dst, messages)
    return unary + incoming


def lbp_beliefs(fixed: torch.Tensor, moving: torch.Tensor, feat_fixed: torch.Tensor, feat_moving: torch.Tensor,
                config: LBPConfig = LBPConfig(), *, centres: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates ``(N, K, 3)`` and their min-sum beliefs ``(N, K)`` (unit frame); ``centres``
    as in :func:`candidates`."""
    return joint_lbp_beliefs(fixed, moving, [(feat_fixed, feat_moving)], config, centres=centres)


def joint_lbp_beliefs(fixed: torch.Tensor, moving: torch.Tensor,
                      features: Sequence[tuple[torch.Tensor, torch.Tensor]], config: LBPConfig = LBPConfig(), *,
                      centres: torch.Tensor | None = None, graph: tuple[torch.Tensor, torch.Tensor] | None = None,
                      candidate_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`lbp_beliefs` with the data cost of several feature extractors: ``features`` holds
    one ``(feat_fixed (N, C), feat_moving (M, C))`` pair per extractor and the data cost of a
    candidate is the mean of their :func:`feature_cost` (one LBP over shared candidates; for a
    single pair exactly :func:`lbp_beliefs`).

    Already built graphs (:class:`cyclereg.clouds.graphs.PairGraphs`) skip their kNN searches:
    ``graph`` the fixed cloud's :func:`symmetric_edge_index` ``(edge_index, reverse)`` for
    ``config.graph_k``, ``candidate_idx`` the moving indices :func:`candidates` finds around
    ``centres`` (or around the fixed points)."""
    if not features:
        raise ValueError("features: need at least one (feat_fixed, feat_moving) pair")
    _check_lbp_inputs(fixed, moving, features)
    cand, idx = candidates(fixed, moving, config.num_candidates, centres, idx=candidate_idx)
    unary = config.data_weight * (sum(feature_cost(ff, fm, idx) for ff, fm in features) / len(features))
    edge_index, reverse = symmetric_edge_index(fixed, config.graph_k) if graph is None else graph
    belief = min_sum(unary, cand, edge_index, reverse, config.pairwise_weight, config.iterations,
                     source_labels=config.source_labels, prune_from=config.prune_from,
                     prune_fraction=config.prune_fraction)
    return cand, belief


def _check_lbp_inputs(fixed: torch.Tensor, moving: torch.Tensor,
                      features: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """:class:`ValueError` naming the argument unless ``fixed (N, 3)`` and ``moving (M, 3)`` (N, M >= 1)
    and every ``(feat_fixed (N, C), feat_moving (M, C))`` are of one dtype and device (shape checks only:
    they turn calls that would fail inside torch into a message naming the argument)."""
    for name, pts in (("fixed", fixed), ("moving", moving)):
        require_tensor(name, pts)
        check_cloud(name, pts)
    like = (fixed.dtype, fixed.device)
    if (moving.dtype, moving.device) != like:
        raise ValueError(f"moving: {moving.dtype} on {moving.device}, but fixed: {fixed.dtype} on {fixed.device}")
    for i, (ff, fm) in enumerate(features):
        for name, feat, n in ((f"features[{i}][0]", ff, fixed.shape[0]), (f"features[{i}][1]", fm, moving.shape[0])):
            require_tensor(name, feat)
            if feat.ndim != 2 or feat.shape[0] != n:
                raise ValueError(f"{name}: expected ({n}, C), one row per point, got {tuple(feat.shape)}")
            if (feat.dtype, feat.device) != like:
                raise ValueError(f"{name}: {feat.dtype} on {feat.device}, but the points: {like[0]} on {like[1]}")
        if ff.shape[1] != fm.shape[1]:
            raise ValueError(f"features[{i}]: {ff.shape[1]} fixed against {fm.shape[1]} moving channels")


def soft_argmin(cand: torch.Tensor, belief: torch.Tensor, beta: float) -> torch.Tensor:
    """``sum_l softmax(-beta * belief)_l cand_l`` -> ``(N, 3)`` (half-precision inputs,
    :data:`cyclereg.frames.LOW_PRECISION`, are computed in float32 and answered in their dtype)."""
    if belief.dtype in LOW_PRECISION or cand.dtype in LOW_PRECISION:
        out = soft_argmin(cand.to(working_dtype(cand)), belief.to(working_dtype(belief)), beta)
        return out.to(torch.promote_types(cand.dtype, belief.dtype))
    weights = torch.softmax(-beta * belief, dim=1)
    return (weights[:, :, None] * cand).sum(1)


def lbp_displacements(fixed: torch.Tensor, moving: torch.Tensor, feat_fixed: torch.Tensor,
                      feat_moving: torch.Tensor, config: LBPConfig = LBPConfig(), *,
                      centres: torch.Tensor | None = None) -> torch.Tensor:
    """Displacements ``(N, 3)`` (unit frame) of the fixed points by sparse LBP + soft-argmin.

    Differentiable with respect to the features. ``centres``: where to search for candidates
    (see :func:`candidates`).
    """
    return joint_lbp_displacements(fixed, moving, [(feat_fixed, feat_moving)], config, centres=centres)


def joint_lbp_displacements(fixed: torch.Tensor, moving: torch.Tensor,
                            features: Sequence[tuple[torch.Tensor, torch.Tensor]], config: LBPConfig = LBPConfig(),
                            *, centres: torch.Tensor | None = None,
                            graph: tuple[torch.Tensor, torch.Tensor] | None = None,
                            candidate_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Displacements ``(N, 3)`` (unit frame) by one LBP over the mean data cost of several feature
    extractors (:func:`joint_lbp_beliefs`, also for ``graph`` and ``candidate_idx``) + soft-argmin."""
    cand, belief = joint_lbp_beliefs(fixed, moving, features, config, centres=centres, graph=graph,
                                     candidate_idx=candidate_idx)
    return soft_argmin(cand, belief, config.softmax_beta)
