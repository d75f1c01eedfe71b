"""Cyclical self-training of the keypoint-cloud path (paper Sec. 2.2, 2.3.2, 3.1.2).

Only keypoint clouds are read here: landmarks are evaluation data and never touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from cyclereg.clouds import augment
from cyclereg.clouds.augment import apply_affine, displacements_back
from cyclereg.clouds.features import FeatureEnsemble, GraphFeatureNet, build_graph_net, ensemble_members
from cyclereg.clouds.graphs import PairGraphs, is_similarity
from cyclereg.clouds.lbp import joint_lbp_displacements
from cyclereg.clouds.pipeline import (CloudRegConfig, joint_recentred_displacements, min_cloud_points,
                                      search_centres, test_time_displacements)
from cyclereg.clouds.tps import ThinPlateSpline
from cyclereg.frames import UnitBox
from cyclereg.training.scheduler import (SAMPLING_LOGIT_RANGE, LabelParts, StageSnapshot, difficulty_weights,
                                         initial_network_seed, mean_label_change, training_generator)

LOGGED_LOSS_EPOCHS = 5
"""A stage's logged training loss is the mean over its last this many epochs (the loss the stage
ended with, not its start)."""


def cloud_label_change_mm(old: dict, new: dict, box: UnitBox) -> float | None:
    """Mean distance [mm] between two stages' pseudo labels ``{pair id: (N, 3)}`` (displacements
    in ``box``'s unit frame) over the pairs both hold with the same points: per pair the mean over
    its fixed points, then the mean over pairs; ``None`` where no pair is in both."""
    return mean_label_change(old, new,
                             lambda a, b: box.disp_unit_to_mm(b.float() - a.float()).norm(dim=1).mean().item())


@dataclass(frozen=True)
class CloudCycleConfig:
    """Cyclical self-training settings (paper defaults for the COPD experiment).

    Attributes:
        stages: T, number of self-training stages after stage 0.
        epochs: epochs per stage (one epoch = one pass over the training pairs).
        batch_size: pairs per optimiser step (gradients accumulated).
        lr: initial learning rate of Adam, restored at every stage (warm restart).
        lr_milestones: epochs at which the learning rate is multiplied by ``lr_gamma``.
        lr_gamma: learning-rate decay factor.
        seed: seeds network initialisations (stage 0 and stage 1), sampling and augmentation.
        augment: random affine augmentation of the learning stream's inputs.
        aug_rotation_deg: maximum rotation about each axis [degrees].
        aug_scale: maximum relative isotropic scaling.
        aug_translation: maximum translation per axis [unit frame, i.e. half box extents].
        aug_relative_std: a further random affine map of the moving cloud alone, ``y -> R y + c``
            with ``R = I + s N``, ``c = s n`` (``N``, ``n`` standard normal, ``c`` in the unit frame),
            so that the learning stream also sees motions the training pairs do not hold; the
            target follows (:func:`cyclereg.clouds.augment.displacements_back_relative`). Default
            0.05, the authors' dense setting (the dense path's ``aug_relative_std``; their keypoint
            code has none), adopted for keypoints by a landmark-free rule fixed before its second
            seed ran (docs/benchmarks.md, "A second seed for relative motion"). 0 = off: both
            clouds through one similarity transform, as every run before 2026-12-06; a run.json or
            checkpoint without the key keeps 0.
        refine: non-differentiable refinement of the pseudo labels (stream asymmetry).
        refine_lbp_iterations: LBP sweeps in the pseudo-label stream.
        refine_consistency: forward-backward consistency (average with the negated
            moving->fixed field sampled at the displaced points).
        refine_num_candidates: LBP candidates per fixed point in the pseudo-label stream
            (None = as the learning stream, ``reg.lbp.num_candidates``).
        refine_recentre_passes: re-centred LBP passes in the pseudo-label stream
            (:attr:`cyclereg.clouds.pipeline.CloudRegConfig.recentre_passes`). Default 1,
            chosen without landmarks: on the synthetic breathing pairs (seeds 0-4, random
            features, 10 sweeps, TPS 0.3) the keypoint error was 2.25 -> 2.22 mm at the
            default motion (mean 13 mm) and 7.95 -> 4.47 mm at twice that motion; on COPD
            keypoints alone it removed the soft-argmin mass on the outer quarter of the
            candidate list (1-3.5 % -> 0 %, a sign of a truncated search range) and lowered
            the distance of the warped fixed keypoints to the moving cloud on every pair
            checked, at 2x the LBP cost (docs/benchmarks.md).
        refine_tta_passes: test-time augmentation in the pseudo-label stream and at test time
            (:attr:`cyclereg.clouds.pipeline.CloudRegConfig.tta_passes`): extra registrations
            of randomly affinely transformed copies, averaged. Default 4, chosen without
            landmarks: on the synthetic breathing pairs (seeds 0-4, random features, 10 sweeps,
            TPS 0.3, one re-centred pass) the keypoint error was 2.22 / 2.08 / 2.08 / 2.03 mm
            for 0 / 2 / 4 / 8 extra passes (2.22 / 2.08 / 2.09 / 2.01 with the library's
            copies, ``benchmarks/tta_synthetic.py``); 8 would cost 9x the registration time.
            On the trained COPD models it changed the mean TRE by -0.01 mm only
            (docs/benchmarks.md).
        learn_recentre_passes: re-centred LBP passes in the learning stream, mirroring the
            test-time passes (:attr:`cyclereg.clouds.pipeline.CloudRegConfig.recentre_passes`):
            the first pass(es) run without gradients on the detached features, are smoothed by
            the test-time TPS, and only the last pass, whose candidates are the moving points
            nearest to ``f + u``, is differentiated. 0 = the paper's single differentiable
            pass (and what runs written before this setting existed use). Motivation, measured
            without landmarks: with one pass and K = 64 candidates, 1-4 % of the fixed points of
            the large-motion COPD training pairs have pseudo labels longer than the distance to
            their 64th nearest moving point (unreachable), and 10-17 % longer than 0.8 of it,
            where the soft-argmin is pulled inwards (docs/benchmarks.md).
        refine_tps_regularisation: TPS smoothing of the refined labels (unit frame; 0 = off; the spline
            kernel is the registration's, ``reg.tps.kernel``).
            Refinement defaults were chosen on synthetic breathing pairs with known motion
            (:mod:`cyclereg.clouds.synthetic`, no landmarks): TPS smoothing 0.3 cut the
            stage-0 label error from 3.5/4.1 to 2.0/2.2 mm, forward-backward consistency
            did not help there (the sparser moving->fixed direction is noisier), so it is off.
        weighted_sampling: difficulty-weighted sampling of training pairs.
        sampling_logit_range: sigmoid arguments run linearly from +r (easiest pair) to -r.
        train_fixed_points: random subset of fixed points per training sample (None = all).
        train_moving_points: random subset of moving points per training sample (None = all).
        reg: the registration model (network, LBP, TPS).
    """

    stages: int = 5
    epochs: int = 60
    batch_size: int = 4
    lr: float = 1e-3
    lr_milestones: tuple[int, ...] = (40, 52)
    lr_gamma: float = 0.1
    seed: int = 0
    augment: bool = True
    aug_rotation_deg: float = 10.0
    aug_scale: float = 0.1
    aug_translation: float = 0.1
    aug_relative_std: float = 0.05
    refine: bool = True
    refine_lbp_iterations: int = 10
    refine_consistency: bool = False
    refine_num_candidates: int | None = None
    refine_recentre_passes: int = 1
    refine_tta_passes: int = 4
    refine_tps_regularisation: float = 0.3
    learn_recentre_passes: int = 0
    weighted_sampling: bool = True
    sampling_logit_range: float = SAMPLING_LOGIT_RANGE
    train_fixed_points: int | None = None
    train_moving_points: int | None = None
    reg: CloudRegConfig = field(default_factory=CloudRegConfig)

    def __post_init__(self):
        """Every setting checked by type and range: a run.json edited by hand reaches here unchecked otherwise
        (a text lr was a TypeError mid-stage, augment "no" counted as on, epochs 0 a ZeroDivisionError)."""
        from cyclereg.errors import finite_number, require_config_fields, require_config_seed, whole_number

        require_config_seed(self.seed)
        require_config_fields(
            self, counts={"stages": 1, "epochs": 1, "batch_size": 1, "refine_lbp_iterations": 0,
                          "refine_recentre_passes": 0, "refine_tta_passes": 0, "learn_recentre_passes": 0},
            optional_counts=("refine_num_candidates", "train_fixed_points", "train_moving_points"),
            switches=("augment", "refine", "refine_consistency", "weighted_sampling"),
            numbers={"lr": True, "lr_gamma": True, "aug_rotation_deg": False, "aug_scale": False,
                     "aug_translation": False, "refine_tps_regularisation": False, "sampling_logit_range": False})
        if not isinstance(self.lr_milestones, tuple) or not all(whole_number(m) and m >= 0
                                                                 for m in self.lr_milestones):
            raise ValueError(f"lr_milestones={self.lr_milestones!r}: need whole numbers of epochs")
        if not (finite_number(self.aug_relative_std) and 0 <= self.aug_relative_std < 1):
            raise ValueError(f"aug_relative_std={self.aug_relative_std!r}: need a value in [0, 1)")  # 1: often singular

    @staticmethod
    def from_dict(d: dict) -> "CloudCycleConfig":
        d = dict(d)
        reg = CloudRegConfig.from_dict(d.pop("reg", {}))
        # runs and checkpoints written before re-centring existed keep their single pass
        d.setdefault("refine_recentre_passes", 0)
        d.setdefault("refine_tta_passes", 0)  # and before test-time augmentation, theirs
        d.setdefault("learn_recentre_passes", 0)
        d.setdefault("aug_relative_std", 0.0)  # and before relative motion, none
        if isinstance(d.get("lr_milestones"), list):  # JSON's form of the tuple (a text stays a text: refused)
            d["lr_milestones"] = tuple(d["lr_milestones"])
        return CloudCycleConfig(reg=reg, **d)


# ----------------------------------------------------------------------------- augmentation
def random_affine(generator: torch.Generator, cfg: CloudCycleConfig, dtype=torch.float32):
    """The learning stream's augmentation: :func:`cyclereg.clouds.augment.random_affine` with
    ``cfg``'s ranges."""
    return augment.random_affine(generator, cfg.aug_rotation_deg, cfg.aug_scale, cfg.aug_translation, dtype)


def test_time_config(cfg: CloudCycleConfig) -> CloudRegConfig:
    """The registration settings stored with a trained model (what ``register``/``evaluate`` use).

    The paper applies its pseudo-label refinement at test time as well, so a trained model
    registers with the pseudo-label stream's LBP sweeps and TPS smoothing. This holds also
    when the ``refine`` switch is off (the "w/o PL refinement" ablation changes only what
    the network learns from, not how it is tested). Decided without landmarks: on the five
    synthetic breathing pairs (:mod:`cyclereg.clouds.synthetic`, seeds 0-4, random
    features) it lowers the mean error of the densified field at the fixed keypoints from
    2.65 to 2.25 mm, on every pair.
    """
    tps = cfg.reg.tps
    if cfg.refine_tps_regularisation > 0:
        tps = replace(tps, regularisation=cfg.refine_tps_regularisation)
    lbp = replace(cfg.reg.lbp, iterations=cfg.refine_lbp_iterations)
    if cfg.refine_num_candidates is not None:
        lbp = replace(lbp, num_candidates=cfg.refine_num_candidates)
    return replace(cfg.reg, lbp=lbp, tps=tps, recentre_passes=cfg.refine_recentre_passes,
                   tta_passes=cfg.refine_tta_passes)


def learning_prediction(model: GraphFeatureNet | FeatureEnsemble, fixed_u: torch.Tensor, moving_u: torch.Tensor,
                        cfg: CloudCycleConfig, features: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
                        graphs: PairGraphs | None = None) -> torch.Tensor:
    """The learning stream's differentiable displacements ``(N, 3)`` (unit frame) of the fixed
    points: one LBP pass with ``cfg.reg.lbp``, preceded by ``cfg.learn_recentre_passes``
    gradient-free passes that re-centre its candidate search (see :class:`CloudCycleConfig`).

    ``model``: one network, or a :class:`~cyclereg.clouds.features.FeatureEnsemble` trained
    jointly: then every pass is one LBP over the mean feature cost of its members (joint fusion,
    as :func:`cyclereg.clouds.pipeline.test_time_displacements` registers with
    ``ensemble_fusion = "joint"``) and the loss reaches every member through it.
    ``features``: one ``(feat_f, feat_m)`` per network of ``model`` if already computed.
    ``graphs``: the pair's kNN graphs for ``cfg.reg`` (:class:`~cyclereg.clouds.graphs.PairGraphs`,
    e.g. built before a similarity transform of both clouds); by default searched here."""
    edges = None if graphs is None else graphs.feature_edges
    if features is None:
        features = [net.pair(fixed_u, moving_u, edges) for net in ensemble_members(model)]
    centres = None
    if cfg.learn_recentre_passes > 0:
        # the test-time search with one re-centred pass fewer, then its centres for the last pass
        search = replace(cfg.reg, tps=test_time_config(cfg).tps, recentre_passes=cfg.learn_recentre_passes - 1)
        with torch.no_grad():
            detached = [(ff.detach(), fm.detach()) for ff, fm in features]
            disp = joint_recentred_displacements(fixed_u, moving_u, detached, search, graphs=graphs)
            centres = search_centres(fixed_u, disp, search.tps)
    graph = None if graphs is None else graphs.lbp_graph
    first = None if graphs is None or centres is not None else graphs.candidates
    return joint_lbp_displacements(fixed_u, moving_u, features, cfg.reg.lbp, centres=centres, graph=graph,
                                   candidate_idx=first)


# ----------------------------------------------------------------------------- task
Labeller = tuple[torch.nn.Module, CloudRegConfig]
"""A model (network or :class:`~cyclereg.clouds.features.FeatureEnsemble`) and the registration
settings with which it makes refined pseudo labels in place of the learning network."""


def initial_network(cfg: CloudCycleConfig, stage: int) -> GraphFeatureNet:
    """The randomly initialised network (CPU) a stage starts from when it has no previous weights
    (seeded by :func:`~cyclereg.training.scheduler.initial_network_seed`): for stage 0 the network that
    made the run's stage-0 labels."""
    return build_graph_net(cfg.reg.net, seed=initial_network_seed(cfg.seed, stage))


@dataclass
class CloudPairData:
    """Keypoints of one training pair in the unit frame (no landmarks)."""

    id: str
    fixed: torch.Tensor
    moving: torch.Tensor


class CloudCycleTask:
    """:class:`~cyclereg.training.scheduler.StageTask` for keypoint clouds."""

    checkpoint_kind = "cloud"

    def __init__(self, pairs: list[CloudPairData], box: UnitBox, config: CloudCycleConfig, device: torch.device):
        if not pairs:
            raise ValueError("pairs: need at least one training pair")
        self.pairs = pairs
        self.box = box
        self.config = config
        self.device = device
        self._graphs: dict[str, PairGraphs] = {}

    def ran_on(self, stage: int) -> dict:
        """:meth:`~cyclereg.training.scheduler.StageTask.ran_on`: the device; clouds train in float32
        (stage 0 trains nothing: ``None``)."""
        return {"device": str(self.device), "training_precision": "float32" if stage >= 1 else None}

    def pair_graphs(self, pair: CloudPairData) -> PairGraphs:
        """The kNN graphs of ``pair``'s whole clouds (on the task's device), built on first use.

        They hold for every augmented copy of the pair (:mod:`cyclereg.clouds.graphs`), so a
        training sample on all keypoints skips every neighbour search but a re-centred pass's
        (an epoch 14-22 % faster on CPU, docs/benchmarks.md "kNN graphs built once per pair")."""
        if pair.id not in self._graphs:
            self._graphs[pair.id] = PairGraphs.build(pair.fixed.to(self.device), pair.moving.to(self.device),
                                                     self.config.reg.net, self.config.reg.lbp)
        return self._graphs[pair.id]

    def label_shapes(self) -> dict[str, tuple[int, int]]:
        """``{pair id: (fixed points, 3)}``: the shape of each training pair's pseudo label (the scheduler
        checks stored labels against it)."""
        return {pair.id: (int(pair.fixed.shape[0]), 3) for pair in self.pairs}

    def new_model(self, stage: int) -> GraphFeatureNet:
        return initial_network(self.config, stage).to(self.device)

    def model_config(self) -> CloudRegConfig:
        """What a checkpoint stores: the test-time settings and the unit frame trained in."""
        return replace(test_time_config(self.config), training_box=self.box)

    # ------------------------------------------------------------------ pseudo labels
    @torch.no_grad()
    def refine(self, model: GraphFeatureNet, pair: CloudPairData, labeller: Labeller | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Network output and refined pseudo label ``(N, 3)`` (unit frame) of one pair.

        ``labeller``: ``(network or ensemble, registration settings)`` that registers the pair
        for the refined label instead of ``model`` with the pseudo-label stream's settings
        (e.g. an ensemble of independently trained models); the TPS smoothing and the
        consistency step stay the stream's. Without one, a
        :class:`~cyclereg.clouds.features.FeatureEnsemble` ``model`` labels by joint fusion, as
        it learns (:func:`learning_prediction`)."""
        cfg = self.config
        model.eval()
        f, m = pair.fixed.to(self.device), pair.moving.to(self.device)
        graphs = self.pair_graphs(pair)  # the same graphs the searches below would build
        features = [net.pair(f, m, graphs.feature_edges) for net in ensemble_members(model)]  # raw output and label
        raw = learning_prediction(model, f, m, cfg, features=features, graphs=graphs)
        if not cfg.refine:
            return raw, raw
        if labeller is None:
            label_net, stream = model, test_time_config(cfg)
            if len(features) > 1:  # an ensemble learns through the joint stream, so it labels jointly too
                stream = replace(stream, ensemble_size=len(features), ensemble_fusion="joint")
            fwd = test_time_displacements(model, f, m, stream, features=features[0] if len(features) == 1 else None)
        else:
            label_net, stream = labeller
            label_net.eval()
            fwd = test_time_displacements(label_net, f, m, stream)
        if cfg.refine_consistency:
            bwd = test_time_displacements(label_net, m, f, stream)  # moving -> fixed displacements at moving points
            spline = ThinPlateSpline.fit(m, bwd, regularisation=cfg.refine_tps_regularisation,
                                         kernel=cfg.reg.tps.kernel)
            fwd = 0.5 * (fwd - spline(f + fwd))
        if cfg.refine_tps_regularisation > 0:
            fwd = ThinPlateSpline.fit(f, fwd, regularisation=cfg.refine_tps_regularisation,
                                      kernel=cfg.reg.tps.kernel)(f)
        return raw, fwd

    def make_pseudo_labels(self, model, stage: int, progress=None, labeller: Labeller | None = None,
                           parts: LabelParts | None = None) -> tuple[dict, dict]:
        """Refined labels of every training pair and sampling weights; ``labeller`` as in
        :meth:`refine`; ``parts`` as in :meth:`~cyclereg.training.scheduler.StageTask.make_pseudo_labels`."""
        labels, disagreement, magnitude = {}, {}, []
        task = progress.add_task(f"stage {stage}: pseudo labels", total=len(self.pairs)) if progress else None
        for pair in self.pairs:
            part = LabelParts.get_or_make(parts, pair.id, lambda: self._label_part(model, pair, labeller))
            labels[pair.id] = part["label"]
            disagreement[pair.id] = part["disagreement"]
            magnitude.append(part["magnitude"])
            if progress:
                progress.advance(task)
        if progress:
            progress.remove_task(task)
        weights = self.sampling_weights(disagreement)
        stats = {"pseudo_label_disagreement_mm": sum(disagreement.values()) / len(disagreement),
                 "mean_pseudo_displacement_mm": sum(magnitude) / len(magnitude)}
        return labels, {"weights": weights, "stats": stats}

    def _label_part(self, model, pair: CloudPairData, labeller: Labeller | None) -> dict:
        """Refined label of one pair (CPU) with its disagreement and mean length [mm]."""
        raw, ref = self.refine(model, pair, labeller)
        label = ref.cpu()
        return {"label": label, "disagreement": self.box.disp_unit_to_mm(raw - ref).norm(dim=1).mean().item(),
                "magnitude": self.box.disp_unit_to_mm(label).norm(dim=1).mean().item()}

    def label_change_mm(self, old: dict, new: dict) -> float | None:
        """:func:`cloud_label_change_mm` in the task's unit frame."""
        return cloud_label_change_mm(old, new, self.box)

    def sampling_weights(self, disagreement: dict[str, float]) -> dict[str, float]:
        """Rank pairs by disagreement; sigmoid of arguments from +r (lowest) to -r (highest)."""
        return difficulty_weights(disagreement, enabled=self.config.weighted_sampling,
                                  logit_range=self.config.sampling_logit_range)

    # ------------------------------------------------------------------ training
    def _subset(self, pts: torch.Tensor, n: int | None, g: torch.Generator) -> torch.Tensor:
        if n is None or n >= pts.shape[0]:
            return torch.arange(pts.shape[0])
        return torch.randperm(pts.shape[0], generator=g)[:n]

    def train_stage(self, model, labels: dict, weights: dict, stage: int, progress=None,
                    snapshot: StageSnapshot | None = None) -> dict:
        """One stage of training (``epochs`` epochs; a step of a ``snapshot`` is an epoch)."""
        cfg = self.config
        g = training_generator(cfg.seed, stage)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(cfg.lr_milestones), cfg.lr_gamma)
        w = torch.tensor([weights.get(p.id, 1.0) for p in self.pairs], dtype=torch.float64)
        steps_per_epoch = max(1, len(self.pairs) // cfg.batch_size)
        start, losses = 0, []
        if snapshot is not None:
            start, losses = snapshot.restore(cfg.epochs, model=model, optimizer=opt, lr_schedule=sched, generator=g,
                                             progress=progress, unit="epoch")
        task = (progress.add_task(f"stage {stage}: training", total=cfg.epochs, completed=start)
                if progress else None)
        model.train()
        for epoch in range(start, cfg.epochs):
            for _step in range(steps_per_epoch):
                opt.zero_grad()
                batch = torch.multinomial(w, cfg.batch_size, replacement=True, generator=g)
                total = 0.0
                for i in batch.tolist():
                    pair = self.pairs[i]
                    fi = self._subset(pair.fixed, cfg.train_fixed_points, g)
                    mi = self._subset(pair.moving, cfg.train_moving_points, g)
                    f, m = pair.fixed[fi].to(self.device), pair.moving[mi].to(self.device)
                    target = labels[pair.id][fi].to(self.device)
                    # random subsets have graphs of their own; whole clouds reuse theirs
                    whole = fi.numel() == pair.fixed.shape[0] and mi.numel() == pair.moving.shape[0]
                    graphs = self.pair_graphs(pair) if whole else None
                    if cfg.augment:
                        A, t = random_affine(g, cfg)
                        if graphs is not None and not is_similarity(A):
                            raise RuntimeError("augmentation is not a similarity transform: the kNN graphs would change")
                        A, t = A.to(self.device), t.to(self.device)
                        f, m = apply_affine(f, A, t), apply_affine(m, A, t)
                        if cfg.aug_relative_std > 0:  # drawn only then: runs without it keep their draws
                            R, c = augment.random_relative_affine(g, cfg.aug_relative_std)
                            m = apply_affine(m, R.to(self.device), c.to(self.device))
                            if graphs is not None:
                                graphs = graphs.moving_changed(f, m, cfg.reg.net, cfg.reg.lbp)
                            pred = augment.displacements_back_relative(
                                learning_prediction(model, f, m, cfg, graphs=graphs), f, A, R, c)
                        else:
                            pred = displacements_back(learning_prediction(model, f, m, cfg, graphs=graphs), A)
                    else:
                        pred = learning_prediction(model, f, m, cfg, graphs=graphs)
                    # mean Euclidean distance in mm (TRE between predicted and pseudo displacements)
                    loss = self.box.disp_unit_to_mm(pred - target).norm(dim=1).mean() / cfg.batch_size
                    loss.backward()
                    total += loss.item()
                opt.step()
                losses.append(total)
            sched.step()
            if snapshot is not None:
                snapshot.offer(epoch + 1, model=model, optimizer=opt, lr_schedule=sched, generator=g, losses=losses)
            if progress:
                progress.update(task, advance=1, description=f"stage {stage}: training (loss {losses[-1]:.2f} mm)")
        if progress:
            progress.remove_task(task)
        tail = losses[-steps_per_epoch * min(LOGGED_LOSS_EPOCHS, cfg.epochs):]
        return {"train_loss_mm": sum(tail) / len(tail), "epochs": cfg.epochs}


def cycle_config(*, stages: int | None = None, epochs: int | None = None, train_points: str | None = None,
                 augment: bool | None = None, refine: bool | None = None, weighted_sampling: bool | None = None,
                 recentre_passes: int | None = None, candidates: int | None = None,
                 tta_passes: int | None = None, learn_recentre_passes: int | None = None,
                 aug_relative: float | None = None, base: CloudCycleConfig | None = None) -> CloudCycleConfig:
    """Apply command-line overrides (``None``: keep ``base``'s value, by default the paper's); changing
    ``epochs`` scales the LR milestones proportionally."""
    from cyclereg.errors import InputError, finite_number, require_count, whole_number

    cfg = base or CloudCycleConfig()
    switches = {"augment": augment, "refine": refine, "weighted_sampling": weighted_sampling}
    changes: dict = {k: v for k, v in switches.items() if v is not None}
    if require_count("--stages", stages, 1) is not None:
        changes["stages"] = stages
    if require_count("--epochs", epochs, 1) is not None:
        changes["epochs"] = epochs
        changes["lr_milestones"] = tuple(max(1, round(m * epochs / cfg.epochs)) for m in cfg.lr_milestones)
    if require_count("--candidates", candidates, 1) is not None:
        changes["reg"] = replace(cfg.reg, lbp=replace(cfg.reg.lbp, num_candidates=candidates))
    if require_count("--recentre-passes", recentre_passes, 0) is not None:
        changes["refine_recentre_passes"] = recentre_passes
    if require_count("--tta-passes", tta_passes, 0) is not None:
        changes["refine_tta_passes"] = tta_passes
    if require_count("--learn-recentre-passes", learn_recentre_passes, 0) is not None:
        changes["learn_recentre_passes"] = learn_recentre_passes
    if aug_relative is not None:
        if not finite_number(aug_relative) or not 0 <= aug_relative < 1:
            raise InputError(f"--aug-relative {aug_relative!r}: need a value in [0, 1)")
        changes["aug_relative_std"] = float(aug_relative)
    if train_points is not None:
        try:  # the command's text "F,M", or (library callers) a pair of whole numbers
            parts = train_points.split(",") if isinstance(train_points, str) else list(train_points)
            if not isinstance(train_points, str) and not all(whole_number(v) for v in parts):
                raise ValueError(train_points)
            nf, nm = (int(v) for v in parts)
        except (ValueError, TypeError):
            raise InputError(f"--train-points {train_points!r}: expected 'F,M' (two integers)") from None
        need_f, need_m = min_cloud_points(changes.get("reg", cfg.reg))
        if nf < need_f or nm < need_m:
            raise InputError(f"--train-points {train_points!r}: the kNN graphs need at least {need_f} fixed and "
                             f"{need_m} moving points")
        changes["train_fixed_points"], changes["train_moving_points"] = nf, nm
    return replace(cfg, **changes)
