"""Graph CNN feature extractor on point coordinates (EdgeConv layers, PyG with explicit
``edge_index``), after Hansen & Heinrich (IPMI 2021) as used in the paper (Sec. 2.3.2)."""

from __future__ import annotations

import atexit
import os
import sys
import tempfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import EdgeConv
from torch_geometric.nn.aggr import Aggregation

from cyclereg.clouds.knn import knn_edge_index
from cyclereg.frames import LOW_PRECISION, require_tensor


def pyg_template_files() -> list[str]:
    """Files that PyG (2.5+) rendered for its message-passing layers in this process.

    PyG writes each layer class's generated ``propagate`` code to a temporary ``.py`` file,
    imports it and never deletes it, so every process that builds an ``EdgeConv`` would leave
    ~9 KB in the temporary folder. Only files in that folder named after their module count."""
    tmp = os.path.realpath(tempfile.gettempdir())
    found = []
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if (name.startswith("torch_geometric.") and path
                and os.path.dirname(os.path.realpath(path)) == tmp
                and os.path.basename(path).startswith(name + "_")):
            found.append(path)
    return found


@atexit.register
def _remove_pyg_template_files() -> None:
    """At exit (not earlier: tracebacks read their source), delete :func:`pyg_template_files`."""
    for path in pyg_template_files():
        try:
            os.unlink(path)
        except OSError:
            pass


@dataclass(frozen=True)
class GraphNetConfig:
    """Graph CNN settings.

    Attributes:
        channels: output channels of the EdgeConv layers.
        out_channels: feature dimension after the point-wise head.
        k_fixed: neighbours (incl. the point itself) of the fixed cloud's kNN graph.
        k_moving: neighbours of the moving cloud's graph; 0 scales ``k_fixed`` by the
            ratio of point counts (clamped to ``[k_fixed, 4 k_fixed]``, :data:`MOVING_K_MAX_FACTOR`) so that both graphs
            cover about the same spatial neighbourhood (the authors use 4x for clouds of
            2048 and 8192 points). Identical clouds then get identical features.
        negative_slope: LeakyReLU slope.
    """

    channels: tuple[int, ...] = (32, 32, 64)
    out_channels: int = 64
    k_fixed: int = 10
    k_moving: int = 0
    negative_slope: float = 0.01


class CloudNorm(nn.Module):
    """Instance normalisation of ``(M, C)`` rows of one cloud: each channel to zero mean, unit variance
    (half-precision rows, :data:`cyclereg.frames.LOW_PRECISION`, computed in float32 and answered in their dtype)."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in LOW_PRECISION:  # the mean rounded to half precision before it is subtracted: 55 ulps
            return self.forward(x.float()).to(x.dtype)
        if x.shape[0] < 2:  # batch_norm refuses one row; its spread is 0, so every channel becomes 0
            return (x - x.mean(0, keepdim=True)) / (self.eps ** 0.5)
        # the same statistics as batch normalisation over the rows with batch statistics (biased
        # variance, no running averages, no affine part), through its fused kernel: on a
        # (70000, 64) edge tensor ~18x faster than mean/var/divide and ~2x with the backward pass
        return F.batch_norm(x, None, None, training=True, eps=self.eps)


class KnnMaxAggregation(Aggregation):
    """PyG's max aggregation, faster on the graphs of :func:`~cyclereg.clouds.knn.knn_edge_index`.

    There every node is the target of the same number ``k`` of edges, stored in consecutive
    blocks by target (``index = [0]*k + [1]*k + ...``). The messages ``(E, C)`` then view as
    ``(N, k, C)`` and their maximum is one ``amax`` over the middle axis instead of a scatter:
    the same values, and the same gradient (``amax`` shares it evenly among equal maxima, as the
    scatter's backward does), but no scatter and gather in the backward pass, which made PyG's
    max aggregation the costliest step of the graph CNN's backward on COPD clouds (2x faster
    alone; docs/benchmarks.md). Bitwise the same gradient but where a maximum is exactly 0: there
    PyG's scatter counts its zero-filled output as one more tie and passes on only part of the
    gradient, ``amax`` all of it. Any other ``index`` (another layout, a node without edges) falls
    back to PyG's scatter."""

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None, ptr: torch.Tensor | None = None,
                dim_size: int | None = None, dim: int = -2, max_num_elements: int | None = None) -> torch.Tensor:
        k = regular_block_size(index, dim_size) if x.ndim == 2 and dim in (-2, 0) else None
        if k is None:
            return self.reduce(x, index, ptr, dim_size, dim, reduce="max")
        return x.view(dim_size, k, x.shape[1]).amax(dim=1)


def regular_block_size(index: torch.Tensor | None, n: int | None) -> int | None:
    """``k`` if ``index`` is ``[0]*k + [1]*k + ... + [n-1]*k`` (every one of ``n`` targets in one
    block of ``k`` consecutive entries), else None."""
    if index is None or n is None or n < 1 or index.ndim != 1 or index.numel() % n:
        return None
    k = index.numel() // n
    blocks = index.view(n, k)
    if k < 1 or not bool((blocks == torch.arange(n, device=index.device, dtype=index.dtype)[:, None]).all()):
        return None
    return k


def _edge_mlp(cin: int, cout: int, slope: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c in (2 * cin, cout, cout):
        # in place on the normalised edges (their own fresh tensor; batch norm's backward needs its
        # input, not its output): one (E, C) tensor fewer per layer, bitwise the same values and
        # gradients, graph CNN forward + backward ~4 % faster on COPD clouds
        layers += [nn.Linear(c, cout, bias=False), CloudNorm(), nn.LeakyReLU(slope, inplace=True)]
    return nn.Sequential(*layers)


class GraphFeatureNet(nn.Module):
    """Point features from coordinates: three EdgeConv blocks and a point-wise head.

    ``forward(points)`` takes one cloud ``(N, 3)`` (unit frame) and returns ``(N, out_channels)``.
    """

    def __init__(self, config: GraphNetConfig = GraphNetConfig()):
        super().__init__()
        self.config = config
        convs = []
        cin = 3
        for c in config.channels:
            convs.append(EdgeConv(_edge_mlp(cin, c, config.negative_slope), aggr=KnnMaxAggregation()))
            cin = c
        self.convs = nn.ModuleList(convs)
        self.head = nn.Sequential(nn.Linear(cin, config.out_channels, bias=False), CloudNorm(),
                                  nn.Linear(config.out_channels, config.out_channels))

    def forward(self, points: torch.Tensor, k: int, edge_index: torch.Tensor | None = None) -> torch.Tensor:
        require_tensor("points", points)
        if points.ndim != 2 or points.shape[1] != 3:
            raise ValueError(f"points: expected (N, 3), got {tuple(points.shape)}")
        weights = next(iter(self.parameters()), None)
        if weights is not None and (points.dtype, points.device) != (weights.dtype, weights.device):
            raise ValueError(f"points: {points.dtype} on {points.device}, but the network is {weights.dtype} on "
                             f"{weights.device}; move one to the other (net.to(points))")
        if edge_index is None:
            edge_index = knn_edge_index(points, k, include_self=True)
        elif (edge_index.ndim != 2 or edge_index.shape[0] != 2 or edge_index.dtype != torch.long or
              (edge_index.numel() and not 0 <= int(edge_index.min()) <= int(edge_index.max()) < points.shape[0])):
            # an empty (2, 0) graph is one (PyG's: every point aggregates nothing); a negative index counted from the end
            raise ValueError(f"edge_index {tuple(edge_index.shape)} ({edge_index.dtype}): expected (2, E) int64 "
                             f"indices 0..{points.shape[0] - 1} of the {points.shape[0]} points")
        x = points
        for conv in self.convs:
            x = conv(x, edge_index)
        return self.head(x)

    def pair(self, fixed: torch.Tensor, moving: torch.Tensor,
             edges: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of a fixed ``(N, 3)`` and a moving ``(M, 3)`` cloud (shared weights).

        ``edges``: the two clouds' kNN graphs ``(fixed_edges, moving_edges)`` if already built
        (:class:`cyclereg.clouds.graphs.PairGraphs`); by default they are built here."""
        fixed_edges, moving_edges = (None, None) if edges is None else edges
        return (self(fixed, self.config.k_fixed, fixed_edges),
                self(moving, self.moving_k(fixed.shape[0], moving.shape[0]), moving_edges))

    def moving_k(self, n_fixed: int, n_moving: int) -> int:
        """Neighbourhood size of the moving graph (see :class:`GraphNetConfig`)."""
        return moving_graph_k(self.config, n_fixed, n_moving)


MOVING_K_MAX_FACTOR = 4
"""The scaled neighbourhood of the moving graph (``k_moving = 0``) is at most this many times ``k_fixed``."""


def moving_graph_k(config: GraphNetConfig, n_fixed: int, n_moving: int) -> int:
    """Neighbourhood size of the moving cloud's graph for clouds of ``n_fixed`` and ``n_moving``
    points (``config.k_moving``, or the scaled ``k_fixed``; see :class:`GraphNetConfig`)."""
    if config.k_moving > 0:
        return config.k_moving
    k = config.k_fixed
    return int(min(max(round(k * n_moving / max(n_fixed, 1)), k), MOVING_K_MAX_FACTOR * k))


class FeatureEnsemble(nn.Module):
    """Independently trained feature networks of one architecture (``members``).

    Registration combines the members as :attr:`cyclereg.clouds.pipeline.CloudRegConfig.ensemble_fusion`
    says (:func:`cyclereg.clouds.pipeline.test_time_displacements`: averaged answers, or one joint
    LBP per pass); the state dict is the members' under ``members.<i>.``.
    """

    def __init__(self, config: GraphNetConfig = GraphNetConfig(), size: int = 2):
        super().__init__()
        if size < 1:
            raise ValueError(f"size={size}: need at least one member")
        self.config = config
        self.members = nn.ModuleList(GraphFeatureNet(config) for _ in range(size))


def ensemble_members(net: GraphFeatureNet | FeatureEnsemble) -> list[GraphFeatureNet]:
    """The feature networks of ``net``: its members for an ensemble, else ``[net]``."""
    return list(net.members) if isinstance(net, FeatureEnsemble) else [net]


def build_graph_net(config: GraphNetConfig = GraphNetConfig(), *, seed: int | None = None) -> GraphFeatureNet:
    """A freshly (randomly) initialised network; ``seed`` makes the initialisation reproducible."""
    if seed is None:
        return GraphFeatureNet(config)
    # the layers are initialised on the CPU from its default generator: seed that one alone, and
    # give it back its state afterwards (torch.manual_seed would also reseed every CUDA generator)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        return GraphFeatureNet(config)
