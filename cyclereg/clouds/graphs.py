"""The kNN graphs of one fixed/moving pair, built once and reused.

A registration of a pair (:func:`cyclereg.training.clouds.learning_prediction`, the test-time
passes of :mod:`cyclereg.clouds.pipeline`) searches nearest neighbours several times: the graph
CNN's graph of each cloud, the LBP graph of the fixed cloud and the first pass's candidates
(the moving points nearest to each fixed point). Each depends only on distances within or
between the two clouds, so it does not change when both clouds go through one similarity
transform ``x -> s R x + t`` (rotation ``R``, isotropic scale ``s > 0``): the training
augmentation (:func:`cyclereg.clouds.augment.random_affine`) is such a transform. Training builds
them once per pair on the untransformed clouds and reuses them every epoch and stage.

Only candidates around the fixed points are kept; a re-centred pass searches around ``f + u``,
which changes with the features, and keeps its own search.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from cyclereg.clouds.features import GraphNetConfig, moving_graph_k
from cyclereg.clouds.knn import knn_edge_index, knn_indices, symmetric_edge_index
from cyclereg.clouds.lbp import LBPConfig, candidate_count

SIMILARITY_TOLERANCE = 1e-5
"""Relative tolerance of :func:`is_similarity` (float32 transforms pass, a 0.1 % shear does not)."""


@dataclass(frozen=True)
class PairGraphs:
    """kNN graphs of a fixed ``(N, 3)`` and a moving ``(M, 3)`` cloud (indices, no coordinates).

    Attributes:
        fixed_edges: ``(2, N k_fixed)`` graph CNN graph of the fixed cloud
            (:func:`cyclereg.clouds.knn.knn_edge_index`, self loops included).
        moving_edges: ``(2, M k_m)`` the same for the moving cloud, ``k_m`` from
            :func:`cyclereg.clouds.features.moving_graph_k`.
        lbp_edges: ``(2, E)`` LBP graph of the fixed cloud (``graph_k`` neighbours, symmetrised).
        lbp_reverse: ``(E,)`` index of each LBP edge's opposite edge.
        candidates: ``(N, K)`` indices of the ``K`` moving points nearest to each fixed point.
    """

    fixed_edges: torch.Tensor
    moving_edges: torch.Tensor
    lbp_edges: torch.Tensor
    lbp_reverse: torch.Tensor
    candidates: torch.Tensor

    @staticmethod
    def build(fixed: torch.Tensor, moving: torch.Tensor, net: GraphNetConfig, lbp: LBPConfig) -> "PairGraphs":
        """The graphs that a network of ``net`` and an LBP pass of ``lbp`` search for on this pair."""
        for name, pts in (("fixed", fixed), ("moving", moving)):
            if pts.ndim != 2 or pts.shape[1] != 3:
                raise ValueError(f"{name}: expected (N, 3), got {tuple(pts.shape)}")
        if fixed.dtype != moving.dtype:  # named here: the candidate search would call them query / reference
            raise ValueError(f"fixed: {fixed.dtype}, but moving: {moving.dtype}; give both alike")
        edges, reverse = symmetric_edge_index(fixed, lbp.graph_k)
        return PairGraphs(fixed_edges=knn_edge_index(fixed, net.k_fixed, include_self=True),
                          lbp_edges=edges, lbp_reverse=reverse, **_moving_graphs(fixed, moving, net, lbp))

    def moving_changed(self, fixed: torch.Tensor, moving: torch.Tensor, net: GraphNetConfig, lbp: LBPConfig
                       ) -> "PairGraphs":
        """These graphs after the moving cloud alone went through a transform that is not a common
        similarity (e.g. a relative affine of the augmentation): the fixed cloud's graphs are kept,
        the moving cloud's graph and the candidates are searched again on ``fixed`` / ``moving``."""
        return replace(self, **_moving_graphs(fixed, moving, net, lbp))

    @property
    def feature_edges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fixed_edges, moving_edges)`` as :meth:`cyclereg.clouds.features.GraphFeatureNet.pair` takes them."""
        return self.fixed_edges, self.moving_edges

    @property
    def lbp_graph(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lbp_edges, lbp_reverse)`` as :func:`cyclereg.clouds.lbp.joint_lbp_beliefs` takes them."""
        return self.lbp_edges, self.lbp_reverse


def _moving_graphs(fixed: torch.Tensor, moving: torch.Tensor, net: GraphNetConfig, lbp: LBPConfig) -> dict:
    """The :class:`PairGraphs` fields that depend on where the moving cloud lies: its graph CNN graph
    (``moving_edges``) and the first pass's ``candidates``."""
    return {"moving_edges": knn_edge_index(moving, moving_graph_k(net, fixed.shape[0], moving.shape[0]),
                                           include_self=True),
            "candidates": knn_indices(fixed, moving, candidate_count(lbp.num_candidates, moving.shape[0]))}


def is_similarity(A: torch.Tensor) -> bool:
    """Whether the linear part ``A`` ``(3, 3)`` is a scaled rotation or reflection (``A A^T = s^2 I``,
    ``s > 0``), i.e. keeps every kNN graph (:class:`PairGraphs`) of the points it maps."""
    if A.shape != (3, 3):
        raise ValueError(f"A: expected (3, 3), got {tuple(A.shape)}")
    gram = (A.double() @ A.double().T)
    s2 = gram.diagonal().mean()
    return bool(s2 > 0) and bool(torch.allclose(gram, s2 * torch.eye(3, dtype=gram.dtype, device=gram.device),
                                                atol=SIMILARITY_TOLERANCE * float(s2), rtol=0))
