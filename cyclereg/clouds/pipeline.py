"""Keypoint-cloud registration: ``f(F, M) = h(g(F, M))`` with the graph CNN ``g`` and
sparse LBP ``h``, densified by a thin-plate spline."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from cyclereg.clouds.augment import apply_affine, displacements_back, random_affine
from cyclereg.clouds.features import FeatureEnsemble, GraphFeatureNet, GraphNetConfig, ensemble_members
from cyclereg.clouds.graphs import PairGraphs, is_similarity
from cyclereg.clouds.lbp import LBPConfig, joint_lbp_displacements, lbp_displacements
from cyclereg.clouds.tps import ThinPlateSpline, TPSConfig, spans_volume
from cyclereg.frames import (ALIGN_CORNERS, LOW_PRECISION, UnitBox, check_cloud, mm_disp_to_voxel, require_finite,
                             voxel_coordinates, voxel_to_world, working_dtype, zyx_grid_affine)
from cyclereg.metrics import sdlogj


ENSEMBLE_FUSIONS = ("average", "joint")
"""Values of :attr:`CloudRegConfig.ensemble_fusion`."""


@dataclass(frozen=True)
class CloudRegConfig:
    """Configuration of the keypoint-cloud path (network, optimiser, densification).

    Attributes:
        net: graph CNN.
        lbp: sparse loopy belief propagation.
        tps: thin-plate-spline densification.
        box_margin: when no volume box is known, the unit frame is the clouds' bounding
            box enlarged by this fraction per side.
        recentre_passes: extra LBP passes after the first whose candidates are the
            ``lbp.num_candidates`` moving points nearest to ``f + u`` (``u``: the previous
            pass smoothed by the TPS of ``tps``) instead of nearest to ``f``, so the search
            range follows large motion at the cost of one more LBP each. 0 = the paper's
            single pass. Not used in the differentiable training stream.
        recentre_candidates: candidates of each re-centred pass (the moving points nearest to
            ``f + u``); None = ``lbp.num_candidates``. More widen the search around the first
            estimate at O(K^2) message cost per pass. With ``ensemble_fusion = "joint"`` it
            applies to the joint registration only: the members' own registrations, which give
            only the spread (:func:`fused_and_member_displacements`), search ``lbp.num_candidates``.
        tta_passes: test-time augmentation: extra registrations of randomly affinely
            transformed copies of both clouds (unit frame), each mapped back and averaged
            with the plain pass (``P + 1`` passes, ``P + 1`` times the cost). 0 = off (the
            paper's single pass). Not used in the differentiable training stream.
        tta_rotation_deg: maximum rotation about each axis of a test-time copy [degrees].
        tta_scale: maximum relative isotropic scaling of a test-time copy.
        tta_translation: maximum translation per axis of a test-time copy [unit frame].
        tta_seed: seeds the test-time transforms (the same copies for every pair, so a
            registration is deterministic).
        ensemble_size: number of independently trained feature networks stored together
            (:class:`cyclereg.clouds.features.FeatureEnsemble`), combined as
            ``ensemble_fusion`` says. 1 = a single network, as trained.
        ensemble_fusion: how an ensemble combines its members (no effect on one network).
            ``"average"``: each member registers the pair on its own with the settings above
            and their displacements are averaged (``ensemble_size`` LBPs per pass).
            ``"joint"``: every LBP pass (the first, the re-centred ones, those of augmented
            copies) is one LBP over shared candidates whose data cost is the mean of the
            members' feature costs, a product of experts: the members vote per candidate
            instead of averaging their answers, which may lie in different modes (one LBP per
            pass). Checkpoints written before this field load as ``"average"``.
        training_box: the unit frame (mm box) the network was trained in, stored with trained
            models so that a pair registered on its own is mapped into the same frame as in
            training (see :func:`registration_box`). None: untrained network, or a checkpoint
            from before it was stored (the clouds' own bounding box is used).
    """

    net: GraphNetConfig = field(default_factory=GraphNetConfig)
    lbp: LBPConfig = field(default_factory=LBPConfig)
    tps: TPSConfig = field(default_factory=TPSConfig)
    box_margin: float = 0.05
    recentre_passes: int = 0
    recentre_candidates: int | None = None
    tta_passes: int = 0
    tta_rotation_deg: float = 10.0
    tta_scale: float = 0.1
    tta_translation: float = 0.1
    tta_seed: int = 0
    ensemble_size: int = 1
    ensemble_fusion: str = "average"
    training_box: UnitBox | None = None

    def __post_init__(self):
        if self.ensemble_size < 1:
            raise ValueError(f"ensemble_size={self.ensemble_size}: need 1 or more")
        if self.ensemble_fusion not in ENSEMBLE_FUSIONS:
            raise ValueError(f"ensemble_fusion={self.ensemble_fusion!r}: expected one of {', '.join(ENSEMBLE_FUSIONS)}")
        if self.recentre_passes < 0:
            raise ValueError(f"recentre_passes={self.recentre_passes}: need 0 or more")
        if self.recentre_candidates is not None and self.recentre_candidates < 1:
            raise ValueError(f"recentre_candidates={self.recentre_candidates}: need 1 or more (or None)")
        if self.tta_passes < 0:
            raise ValueError(f"tta_passes={self.tta_passes}: need 0 or more")
        if not (0 <= self.tta_scale < 1):
            raise ValueError(f"tta_scale={self.tta_scale}: need 0 <= scale < 1")
        if self.tta_rotation_deg < 0 or self.tta_translation < 0:
            raise ValueError(f"tta_rotation_deg={self.tta_rotation_deg}, tta_translation={self.tta_translation}: "
                             "need ranges >= 0")

    @staticmethod
    def from_dict(d: dict) -> "CloudRegConfig":
        net = dict(d.get("net", {}))
        if "channels" in net:
            net["channels"] = tuple(net["channels"])
        rest = {k: v for k, v in d.items() if k not in ("net", "lbp", "tps", "training_box")}
        box = d.get("training_box")
        return CloudRegConfig(net=GraphNetConfig(**net), lbp=LBPConfig(**d.get("lbp", {})),
                              tps=TPSConfig(**d.get("tps", {})),
                              training_box=UnitBox(tuple(box["lo_mm"]), tuple(box["extent_mm"])) if box else None,
                              **rest)


def predict_unit(net: GraphFeatureNet, fixed_u: torch.Tensor, moving_u: torch.Tensor,
                 lbp: LBPConfig) -> torch.Tensor:
    """Differentiable displacements ``(N, 3)`` of the fixed points, all in the unit frame."""
    feat_f, feat_m = net.pair(fixed_u, moving_u)
    return lbp_displacements(fixed_u, moving_u, feat_f, feat_m, lbp)


def predict_recentred(net: GraphFeatureNet, fixed_u: torch.Tensor, moving_u: torch.Tensor,
                      config: CloudRegConfig) -> torch.Tensor:
    """Displacements ``(N, 3)`` (unit frame) with ``config.recentre_passes`` re-centred LBP passes
    after the first (see :class:`CloudRegConfig`); equals :func:`predict_unit` for 0 passes."""
    return recentred_displacements(fixed_u, moving_u, *net.pair(fixed_u, moving_u), config)


def recentred_displacements(fixed_u: torch.Tensor, moving_u: torch.Tensor, feat_f: torch.Tensor,
                            feat_m: torch.Tensor, config: CloudRegConfig) -> torch.Tensor:
    """:func:`predict_recentred` from features already computed (``(N, C)``, ``(M, C)``)."""
    return joint_recentred_displacements(fixed_u, moving_u, [(feat_f, feat_m)], config)


def joint_recentred_displacements(fixed_u: torch.Tensor, moving_u: torch.Tensor,
                                  features: Sequence[tuple[torch.Tensor, torch.Tensor]],
                                  config: CloudRegConfig, *, graphs: PairGraphs | None = None) -> torch.Tensor:
    """:func:`recentred_displacements` with every pass one LBP over the mean data cost of
    several networks' features (``features``: one ``(feat_f, feat_m)`` per network; see
    :func:`cyclereg.clouds.lbp.joint_lbp_beliefs`). Displacements ``(N, 3)``, unit frame.
    ``graphs``: the pair's kNN graphs for ``config`` if already built (every pass uses its LBP
    graph, the first pass its candidates)."""
    graph, first = (None, None) if graphs is None else (graphs.lbp_graph, graphs.candidates)
    disp = joint_lbp_displacements(fixed_u, moving_u, features, config.lbp, graph=graph, candidate_idx=first)
    recentred = config.lbp if config.recentre_candidates is None else \
        replace(config.lbp, num_candidates=config.recentre_candidates)
    for _ in range(config.recentre_passes):
        disp = joint_lbp_displacements(fixed_u, moving_u, features, recentred,
                                       centres=search_centres(fixed_u, disp, config.tps), graph=graph)
    return disp


def search_centres(fixed_u: torch.Tensor, disp: torch.Tensor, tps: TPSConfig) -> torch.Tensor:
    """Where a re-centred LBP pass searches: ``f + u`` with ``u`` the displacements ``disp``
    ``(N, 3)`` of the fixed points ``fixed_u`` ``(N, 3)`` smoothed by the TPS ``tps`` (unit frame)."""
    return fixed_u + ThinPlateSpline.fit(fixed_u, disp, regularisation=tps.regularisation, kernel=tps.kernel)(fixed_u)


def test_time_displacements(net: GraphFeatureNet | FeatureEnsemble, fixed_u: torch.Tensor, moving_u: torch.Tensor,
                            config: CloudRegConfig, *,
                            features: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Test-time displacements ``(N, 3)`` (unit frame): the re-centred prediction of
    :func:`predict_recentred` on the plain clouds, averaged with the same prediction on
    ``config.tta_passes`` randomly affinely transformed copies of both clouds, each mapped
    back (``u = A^{-1} u'``); a :class:`FeatureEnsemble` combines its members as
    ``config.ensemble_fusion`` says (averaged answers, or one joint LBP per pass).
    ``features``: the plain pass's ``(feat_f, feat_m)`` of a single network if already
    computed. Equals :func:`predict_recentred` for one network and ``tta_passes = 0``."""
    members = ensemble_members(net)
    graphs = PairGraphs.build(fixed_u, moving_u, config.net, config.lbp)  # shared by members and passes
    if len(members) > 1 and config.ensemble_fusion == "joint":
        if features is not None:
            raise ValueError("features: only for a single network, not an ensemble")
        plain = [m.pair(fixed_u, moving_u, graphs.feature_edges) for m in members]
        return _joint_tta_displacements(members, fixed_u, moving_u, config, plain, graphs)
    each = member_displacements(net, fixed_u, moving_u, config, features=features, graphs=graphs)
    return sum(each) / len(each)


def fused_and_member_displacements(net: GraphFeatureNet | FeatureEnsemble, fixed_u: torch.Tensor,
                                   moving_u: torch.Tensor, config: CloudRegConfig
                                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:func:`test_time_displacements` and each member's own (:func:`member_displacements`),
    computing every member's features of the plain clouds once for both (unit frame).

    With ``ensemble_fusion = "joint"`` the members' own registrations are not part of the result,
    only of the spread it reports (:func:`member_spread`), so their re-centred passes search
    ``lbp.num_candidates`` moving points, not ``recentre_candidates``: a diagnostic should not
    cost several times the registration."""
    members = ensemble_members(net)
    graphs = PairGraphs.build(fixed_u, moving_u, config.net, config.lbp)
    plain = [m.pair(fixed_u, moving_u, graphs.feature_edges) for m in members]
    joint = len(members) > 1 and config.ensemble_fusion == "joint"
    own = replace(config, recentre_candidates=None) if joint else config
    each = [_tta_displacements(m, fixed_u, moving_u, own, f, graphs) for m, f in zip(members, plain)]
    if joint:
        return _joint_tta_displacements(members, fixed_u, moving_u, config, plain, graphs), each
    return sum(each) / len(each), each


def member_displacements(net: GraphFeatureNet | FeatureEnsemble, fixed_u: torch.Tensor, moving_u: torch.Tensor,
                         config: CloudRegConfig, *, features: tuple[torch.Tensor, torch.Tensor] | None = None,
                         graphs: PairGraphs | None = None) -> list[torch.Tensor]:
    """Each member's own test-time displacements ``(N, 3)`` (unit frame): what
    :func:`test_time_displacements` averages with ``ensemble_fusion = "average"`` (one entry
    for a single network). ``graphs``: the pair's kNN graphs for ``config``, if already built."""
    members = ensemble_members(net)
    if features is not None and len(members) > 1:
        raise ValueError("features: only for a single network, not an ensemble")
    if graphs is None:
        graphs = PairGraphs.build(fixed_u, moving_u, config.net, config.lbp)
    return [_tta_displacements(m, fixed_u, moving_u, config, features, graphs) for m in members]


def member_spread(displacements: list[torch.Tensor]) -> torch.Tensor:
    """Per point, the root-mean-square distance of the members' displacements ``E x (N, 3)`` from
    their average -> ``(N,)`` (units of the input). Zero for a single member. A landmark-free
    measure of how much independently trained networks disagree at each point."""
    stacked = torch.stack(displacements)
    if stacked.dtype in LOW_PRECISION:  # computed in float32, answered in the members' dtype
        return member_spread([d.float() for d in displacements]).to(stacked.dtype)
    return (stacked - stacked.mean(0)).pow(2).sum(-1).mean(0).sqrt()


def _tta_displacements(net: GraphFeatureNet, fixed_u: torch.Tensor, moving_u: torch.Tensor,
                       config: CloudRegConfig, features: tuple[torch.Tensor, torch.Tensor] | None,
                       graphs: PairGraphs) -> torch.Tensor:
    """:func:`test_time_displacements` of one network; ``graphs``: the pair's kNN graphs, which
    hold for the transformed copies as well (:mod:`cyclereg.clouds.graphs`)."""
    edges = graphs.feature_edges
    feat_f, feat_m = features if features is not None else net.pair(fixed_u, moving_u, edges)

    def predict(f: torch.Tensor, m: torch.Tensor, feats: tuple[torch.Tensor, torch.Tensor] | None = None):
        return joint_recentred_displacements(f, m, [feats or net.pair(f, m, edges)], config, graphs=graphs)

    return _with_tta(predict, predict(fixed_u, moving_u, (feat_f, feat_m)), fixed_u, moving_u, config)


def _joint_tta_displacements(members: list[GraphFeatureNet], fixed_u: torch.Tensor, moving_u: torch.Tensor,
                             config: CloudRegConfig, plain: list[tuple[torch.Tensor, torch.Tensor]],
                             graphs: PairGraphs) -> torch.Tensor:
    """:func:`test_time_displacements` of an ensemble with ``ensemble_fusion = "joint"``;
    ``plain``: every member's features of the plain clouds; ``graphs`` as in :func:`_tta_displacements`."""
    edges = graphs.feature_edges
    return _with_tta(lambda f, m: joint_recentred_displacements(f, m, [n.pair(f, m, edges) for n in members], config,
                                                                graphs=graphs),
                     joint_recentred_displacements(fixed_u, moving_u, plain, config, graphs=graphs),
                     fixed_u, moving_u, config)


def _with_tta(predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], plain: torch.Tensor,
              fixed_u: torch.Tensor, moving_u: torch.Tensor, config: CloudRegConfig) -> torch.Tensor:
    """``plain`` (the prediction on the clouds themselves) averaged with ``predict`` on
    ``config.tta_passes`` randomly affinely transformed copies, each mapped back. The copies are
    similarity transforms, so ``predict`` may reuse the plain clouds' kNN graphs."""
    if config.tta_passes == 0:
        return plain
    total = plain
    g = torch.Generator().manual_seed(config.tta_seed)
    for _ in range(config.tta_passes):
        A, t = random_affine(g, config.tta_rotation_deg, config.tta_scale, config.tta_translation, fixed_u.dtype)
        if not is_similarity(A):
            raise RuntimeError("test-time copy is not a similarity transform: the kNN graphs would change")
        fa, ma = apply_affine(fixed_u, A, t), apply_affine(moving_u, A, t)
        total = total + displacements_back(predict(fa, ma), A)
    return total / (config.tta_passes + 1)


@dataclass(frozen=True)
class CloudRegistration:
    """Result of registering two clouds.

    Attributes:
        fixed_mm: ``(N, 3)`` fixed points (mm).
        displacements_mm: ``(N, 3)`` displacements at the fixed points (mm, fixed -> moving).
        box: the unit frame used.
        tps: TPS settings for :meth:`at` and :meth:`dense`.
        member_displacements_mm: for an ensemble, each member's own ``(N, 3)`` displacements
            (mm; their average is ``displacements_mm`` with ``ensemble_fusion = "average"``);
            None for a single network, the identity, or a registration without ``spread``
            (:func:`register_clouds`).
    """

    fixed_mm: torch.Tensor
    displacements_mm: torch.Tensor
    box: UnitBox
    tps: TPSConfig
    member_displacements_mm: tuple[torch.Tensor, ...] | None = None

    def __post_init__(self):
        """Shape and dtype checks naming the attribute (a result built by hand, e.g. from a saved field):
        ``fixed_mm`` ``(N, 3)`` and every displacement ``(N, 3)``, all floating point (integer voxel
        indices are no mm coordinates: the spline and the dense field are floating)."""
        fixed = self.fixed_mm
        check_cloud("fixed_mm", fixed)
        named = [("fixed_mm", fixed), ("displacements_mm", self.displacements_mm)]
        named += [(f"member_displacements_mm[{i}]", d) for i, d in enumerate(self.member_displacements_mm or ())]
        for name, t in named:
            if t.shape != fixed.shape:
                raise ValueError(f"{name}: expected {tuple(fixed.shape)} like fixed_mm, got {tuple(t.shape)}")
            if not t.is_floating_point():
                raise ValueError(f"{name}: {t.dtype} values; give mm as floating point (e.g. .double())")

    @property
    def spread_mm(self) -> torch.Tensor | None:
        """``(N,)``: the members' disagreement at the fixed points (:func:`member_spread`, mm);
        None without members."""
        members = self.member_displacements_mm
        return None if members is None else member_spread(list(members))

    def spread_at(self, query_mm: torch.Tensor) -> torch.Tensor | None:
        """``(M,)``: the members' disagreement (mm) at query points ``(M, 3)`` mm, each member's
        displacements densified by its own TPS (the settings of :meth:`spline`); None without members.
        In the dtype of the registration (``fixed_mm``'s: the query is converted to it; a half-precision one
        computed in float32)."""
        if self.member_displacements_mm is None:
            return None
        work = working_dtype(self.fixed_mm)
        fixed = self.fixed_mm.to(work)
        # one spline with the members' fields as columns: one solve and one kernel evaluation for all
        columns = torch.cat([self.box.disp_mm_to_unit(d.to(work)) for d in self.member_displacements_mm], dim=1)
        spline = ThinPlateSpline.fit(self.box.mm_to_unit(fixed), columns,
                                     regularisation=self.tps.regularisation, kernel=self.tps.kernel)
        fields = spline(self.box.mm_to_unit(query_mm.to(fixed))).split(3, dim=1)
        return member_spread([self.box.disp_unit_to_mm(u) for u in fields]).to(self.fixed_mm.dtype)

    def spline(self) -> ThinPlateSpline:
        """The TPS through the displacements (unit frame; half-precision clouds taken to it in float32)."""
        # half precision to float32 (bfloat16 unit coordinates: 1/128 coarse); other dtypes as they are
        fixed, disp = (t.to(working_dtype(t)) for t in (self.fixed_mm, self.displacements_mm))
        return ThinPlateSpline.fit(self.box.mm_to_unit(fixed), self.box.disp_mm_to_unit(disp),
                                   regularisation=self.tps.regularisation, kernel=self.tps.kernel)

    def at(self, query_mm: torch.Tensor, spline: ThinPlateSpline | None = None) -> torch.Tensor:
        """TPS displacement (mm) at query points ``(M, 3)`` mm: ``(M, 3)`` in the query's dtype, on the
        registration's device (a half-precision query, :data:`~cyclereg.frames.LOW_PRECISION`, is computed in
        float32)."""
        if query_mm.dtype in LOW_PRECISION:
            return self.at(query_mm.float(), spline).to(query_mm.dtype)
        spline = spline or self.spline()
        return self.box.disp_unit_to_mm(spline(self.box.mm_to_unit(query_mm.to(self.fixed_mm.device))))

    def dense(self, affine: np.ndarray, shape: tuple[int, int, int],
              spline: ThinPlateSpline | None = None) -> torch.Tensor:
        """Dense displacement ``(1, 3, D, H, W)`` in voxels of the grid ``(shape, affine)``, in the
        dtype of the fixed cloud (for a half-precision cloud evaluated in float32 and cast once).

        The spline is evaluated on a coarse grid (:meth:`_coarse_grid`: first and last voxel of each
        axis and evenly between, at most ``tps.grid_step`` voxels apart) and upsampled trilinearly.
        """
        spline = spline or self.spline()
        coarse, pts_mm = self._coarse_grid(affine, shape)
        disp_mm = self.at(pts_mm, spline).double()
        disp_mm = disp_mm.reshape(1, *coarse, 3).permute(0, 4, 1, 2, 3)
        disp_vox = mm_disp_to_voxel(disp_mm, torch.as_tensor(affine)).to(self.fixed_mm.dtype)
        return self._upsample(disp_vox, shape)

    def dense_spread(self, affine: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor | None:
        """The members' disagreement (:meth:`spread_at`, mm) on the grid ``(shape, affine)``,
        ``(1, 1, D, H, W)``, evaluated like :meth:`dense`; None without members."""
        if self.member_displacements_mm is None:
            return None
        coarse, pts_mm = self._coarse_grid(affine, shape)
        spread = self.spread_at(pts_mm).to(self.fixed_mm.dtype).reshape(1, 1, *coarse)
        return self._upsample(spread, shape)

    def _coarse_grid(self, affine: np.ndarray, shape) -> tuple[tuple[int, ...], torch.Tensor]:
        """The coarse grid the spline is evaluated on: per axis of ``s`` voxels, ``c = ceil((s - 1) /
        step) + 1`` points from the first voxel to the last, ``(s - 1) / (c - 1) <= step`` voxels apart
        (``step = tps.grid_step``; so that trilinear upsampling with aligned corners puts them back on
        voxels: 10 voxels at step 4 give voxels 0, 3, 6, 9). Its shape and its world points ``(P, 3)`` mm (in the
        fixed cloud's dtype, float32 for half precision)."""
        if len(tuple(shape)) != 3 or min(int(s) for s in shape) < 1:
            raise ValueError(f"shape: expected 3 voxel counts >= 1 (D, H, W), got {tuple(shape)}")
        step = max(1, int(self.tps.grid_step))
        coarse = tuple(int(math.ceil((s - 1) / step)) + 1 for s in shape)
        device = self.fixed_mm.device
        idx = voxel_coordinates(coarse, dtype=torch.float64, device=device)
        idx = idx * torch.tensor([(s - 1) / max(c - 1, 1) for s, c in zip(shape, coarse)], dtype=torch.float64,
                                 device=device)
        pts_mm = voxel_to_world(idx.reshape(-1, 3), torch.as_tensor(affine))
        # world points in half precision are coarse (bfloat16: 1 mm at 190 mm): float32 for those
        return coarse, pts_mm.to(self.fixed_mm.device, working_dtype(self.fixed_mm))

    @staticmethod
    def _upsample(coarse_field: torch.Tensor, shape) -> torch.Tensor:
        """``(1, C, d, h, w)`` -> ``(1, C, *shape)``, trilinear (unchanged when already that size)."""
        if tuple(coarse_field.shape[2:]) == tuple(shape):
            return coarse_field
        return F.interpolate(coarse_field, size=tuple(shape), mode="trilinear", align_corners=ALIGN_CORNERS)


def grid_affine(shape_zyx, spacing_zyx_mm) -> np.ndarray:
    """:func:`~cyclereg.frames.zyx_grid_affine` as a NumPy array (voxel ``(i, j, k)`` at mm ``(k sx, j sy, i sz)``)."""
    return zyx_grid_affine(shape_zyx, spacing_zyx_mm).numpy()


def min_cloud_points(config: CloudRegConfig) -> tuple[int, int]:
    """Fewest points a fixed and a moving cloud need for ``config``: every point needs its
    neighbours in the kNN graphs (the feature graphs count the point itself, ``net.k_fixed`` /
    ``net.k_moving``; the LBP graph of the fixed cloud does not, ``lbp.graph_k``)."""
    return max(config.net.k_fixed, config.lbp.graph_k + 1), config.net.k_moving or config.net.k_fixed


def cloud_problem(points_mm: torch.Tensor, minimum: int, *, spline: bool) -> str | None:
    """Why ``points_mm`` ``(N, 3)`` cannot be registered (``None``: it can): fewer than ``minimum``
    (distinct) points, or, for the cloud a thin-plate spline is fitted on (``spline``), points that span no
    volume (all on one plane or line: the spline's affine part has no unique solution)."""
    n = int(points_mm.shape[0])
    distinct = n if n < minimum else int(torch.unique(points_mm, dim=0).shape[0])
    if distinct < minimum:
        have = (f"{n} point{'s' if n != 1 else ''}" if distinct == n else
                f"only {distinct} distinct point{'s' if distinct != 1 else ''} among {n} (the rest repeat them)")
        return f"{have}; registration needs at least {minimum} (kNN graphs of {minimum - 1} neighbours)"
    if spline:
        if not spans_volume(points_mm):
            return ("all points lie on one plane or line (or coincide): the thin-plate spline needs a cloud "
                    "that spans a volume")
    return None


def registration_box(fixed_mm: torch.Tensor, moving_mm: torch.Tensor, config: CloudRegConfig) -> tuple[UnitBox, str]:
    """The unit frame for one pair registered on its own (no dataset box), and how it was chosen.

    * the network's ``config.training_box``, when the centre of the pair's bounding box lies in it
      (the pair is in the training data's frame): ``"training box"``;
    * a box of the training box's extent centred on the pair (same scale, another origin):
      ``"training box, moved to the clouds"``;
    * without a training box (untrained network, older checkpoint): the clouds' bounding box
      enlarged by ``config.box_margin``: ``"clouds' bounding box"``.
    """
    own = UnitBox.around(fixed_mm, moving_mm, margin=config.box_margin)
    trained = config.training_box
    if trained is None:
        return own, "clouds' bounding box"
    centre = [lo + e / 2 for lo, e in zip(own.lo_mm, own.extent_mm)]
    if all(lo <= c <= lo + e for c, lo, e in zip(centre, trained.lo_mm, trained.extent_mm)):
        return trained, "training box"
    lo = tuple(c - e / 2 for c, e in zip(centre, trained.extent_mm))
    return UnitBox(lo, trained.extent_mm), "training box, moved to the clouds"  # type: ignore[arg-type]


def register_clouds(fixed_mm: torch.Tensor, moving_mm: torch.Tensor, net: GraphFeatureNet | FeatureEnsemble | None,
                    config: CloudRegConfig, *, box: UnitBox | None = None, spread: bool = False) -> CloudRegistration:
    """Register two clouds (mm). ``net=None`` gives the identity (zero displacements); an
    ensemble combines its members as ``config.ensemble_fusion`` says. With ``spread`` an
    ensemble also returns each member's own displacements (for
    :attr:`CloudRegistration.spread_mm`); with joint fusion that runs every member once more on
    its own (about 2x the time for four members), the fused displacements stay the same.
    ``box``: the unit frame (a dataset's volume box); default :func:`registration_box`.

    Shapes: ``fixed_mm`` ``(N, 3)``, ``moving_mm`` ``(M, 3)``, world mm, one device and dtype
    (the network's); the result's displacements are ``(N, 3)`` mm, fixed -> moving."""
    check_cloud("fixed_mm", fixed_mm)
    check_cloud("moving_mm", moving_mm)
    if (moving_mm.device, moving_mm.dtype) != (fixed_mm.device, fixed_mm.dtype):
        raise ValueError(f"moving_mm: {moving_mm.dtype} on {moving_mm.device}, but fixed_mm: {fixed_mm.dtype} on "
                         f"{fixed_mm.device}; give both alike")
    if not fixed_mm.is_floating_point():
        raise ValueError(f"fixed_mm: {fixed_mm.dtype} coordinates; give mm as floating point (e.g. .double())")
    fixed_mm, moving_mm = fixed_mm.detach(), moving_mm.detach()  # inference only: no graph kept in the result
    weights = next(iter(net.parameters()), None) if net is not None else None
    if weights is not None and (weights.dtype, weights.device) != (fixed_mm.dtype, fixed_mm.device):
        raise ValueError(f"fixed_mm: {fixed_mm.dtype} on {fixed_mm.device}, but the network is {weights.dtype} on "
                         f"{weights.device}; move one to the other (net.to(fixed_mm))")
    need_fixed, need_moving = min_cloud_points(config)
    for name, pts, minimum, spline in (("fixed_mm", fixed_mm, need_fixed, True),
                                       ("moving_mm", moving_mm, need_moving, False)):
        require_finite(name, pts, "coordinates")
        problem = cloud_problem(pts, minimum, spline=spline)
        if problem is not None:
            raise ValueError(f"{name}: {problem}")
    box = box or registration_box(fixed_mm, moving_mm, config)[0]
    members = None
    if net is None:
        disp = torch.zeros_like(fixed_mm)
    else:
        fixed_u, moving_u = box.mm_to_unit(fixed_mm), box.mm_to_unit(moving_mm)
        with torch.no_grad():
            if spread:
                fused, each = fused_and_member_displacements(net, fixed_u, moving_u, config)
            else:
                fused, each = test_time_displacements(net, fixed_u, moving_u, config), []
        disp = box.disp_unit_to_mm(fused)
        if len(each) > 1:
            members = tuple(box.disp_unit_to_mm(d) for d in each)
    return CloudRegistration(fixed_mm=fixed_mm, displacements_mm=disp, box=box, tps=config.tps,
                             member_displacements_mm=members)


def field_smoothness(reg: CloudRegistration, shape_zyx, spacing_zyx_mm,
                     spline: ThinPlateSpline | None = None) -> dict[str, float]:
    """SDlogJ (Learn2Reg formula), std(log J) and folding fraction of the TPS field on a grid
    (``spline``: ``reg.spline()`` if already fitted)."""
    disp = reg.dense(grid_affine(shape_zyx, spacing_zyx_mm), tuple(int(s) for s in shape_zyx), spline)
    return sdlogj(disp)
