"""Cyclical self-training of the dense (volume) path (paper Sec. 2.2, 2.3.1, 3.1) and the
metric-supervised baselines ("MIND sup.", "NCC sup.") in the same framework.

The :class:`DenseCycleTask` plugs into the modality-independent
:class:`~cyclereg.training.scheduler.StageScheduler`. Only images are read here: label
maps are evaluation data and never reach this module.

Fields and units: pseudo labels and training predictions live on the *label grid*, every
``label_stride``-th image voxel (label voxel ``n`` is image voxel ``label_stride * n``,
the stride relation of :func:`cyclereg.dense.convex.resample_disp`), in voxels of that
grid, fixed -> moving. Losses are reported in millimetres.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from cyclereg.dense.config import DensePipelineConfig
from cyclereg.dense.data import pair_ids
from cyclereg.dense.convex import resample_disp
from cyclereg.dense.instance import diffusion_regularizer
from cyclereg.dense.network import FeatureNet, init_random
from cyclereg.dense.pipeline import predict_displacement, register
from cyclereg.dense.similarity import mind_loss, ncc_loss
from cyclereg.frames import centred_affine, voxel_coordinates, voxel_disp_to_mm, world_map_to_voxel
from cyclereg.warp import warp_unchecked
from cyclereg.training.scheduler import (SAMPLING_LOGIT_RANGE, LabelParts, StageSnapshot, difficulty_weights,
                                         initial_network_seed, mean_label_change, training_generator)

SUPERVISIONS = ("pseudo", "mind", "ncc")
PROGRESS_LOSS_ITERATIONS = 20
"""The progress bar shows the mean loss of the last this many training iterations."""
LOGGED_LOSS_FRACTION = 5
"""A stage's logged training loss is the mean over its last ``1 / LOGGED_LOSS_FRACTION`` of the
iterations (at most :data:`LOGGED_LOSS_MAX_ITERATIONS`): the loss the stage ended with, not its start."""
LOGGED_LOSS_MAX_ITERATIONS = 50


@dataclass(frozen=True)
class DenseCycleConfig:
    """Self-training settings of the dense path (paper defaults for the abdomen experiment).

    Attributes:
        stages: T, number of self-training stages after stage 0 (paper: 8).
        iterations: optimiser steps per stage (paper: 1000).
        batch_size: pairs per step (paper: 2).
        lr: learning rate at the start of every stage (warm restart; paper: 1e-3).
        lr_min: learning rate at the end of every stage, cosine annealing (paper: 1e-5).
        seed: seeds network initialisations (stage 0 and stage 1), sampling, augmentation.
        supervision: ``"pseudo"`` (cyclical self-training), ``"mind"`` or ``"ncc"``
            (metric-supervised baselines: the same network and optimiser trained to
            maximise the similarity of fixed and warped moving image plus a diffusion
            regulariser; no pseudo labels are made).
        augment: random affine augmentation of the learning stream's inputs, with the
            targets transformed consistently (the pseudo-label stream is not augmented).
        aug_linear_std: standard deviation of the random perturbation ``I + N`` of the
            fixed image's 3x3 matrix, acting on millimetre coordinates about the volume
            centre (reference: 0.075).
        aug_translation_std: standard deviation of the translation, as a fraction of the
            volume's half extent (reference: 0.075).
        aug_relative_std: the moving image's transform is ``(I + N) @ fixed transform`` followed by
            a translation, both with this standard deviation (the translation as a fraction of the
            volume's half extent; reference: 0.05), so the pair also moves relative to each other.
        refine: refine the pseudo labels with the full pipeline of ``pipeline`` (inverse
            consistency, second warp, Adam instance optimisation); off = the network +
            coupled convex output (ablation "w/o PL refinement").
        weighted_sampling: difficulty-weighted pair sampling (ablation switch).
        sampling_logit_range: sigmoid arguments run linearly from +r (easiest pair) to -r.
        label_stride: stride of the label grid (reference: 2, half resolution).
        loss_border: label voxels at each face left out of the loss (reference: 8).
        amp: mixed precision (float16 autocast + gradient scaling) for training on CUDA;
            ignored on CPU.
        cpu_bf16: bfloat16 autocast for training on CPU (no gradient scaling: bfloat16 has
            float32's range); ignored on CUDA. Worth it on CPUs with bfloat16 matrix units
            (Intel AMX, :func:`cyclereg.device.cpu_has_bf16_units`): a training step took 1.27
            instead of 2.3 s at 96 x 80 x 128 and 15.1 instead of 27.4 s at 192 x 160 x 256 on
            two cores of a Xeon with AMX (``benchmarks/dense_train_step.py``), and a 4 mm abdomen
            run reached the same Dice as float32 (0.360 / 0.361, docs/benchmarks.md); elsewhere
            PyTorch emulates it, slowly. Off by default (float32); pseudo labels and test-time
            registration stay float32 either way.
        train_images: ``"held-out"`` trains on the dataset's ``training`` images that occur
            in no ``registration_val`` pair (the Learn2Reg protocol, 20 abdomen scans);
            ``"all"`` on every listed image (test-time self-training, e.g. the brain pair;
            still no labels).
        directions: ``"one"``: pairs ``(i, j)`` with ``i < j`` (190 for 20 scans, as the
            reference); ``"both"``: also ``(j, i)``.
        max_train_pairs: use only this many pairs (CPU-sized runs), spread over the images
            (:func:`cyclereg.training.api.spread_pairs`: each image in about the same number of
            them); None = all.
        metric_reg_weight: weight of the diffusion regulariser (label-grid voxels^2) in the
            metric-supervised losses. Chosen here (untuned): 1.0, VoxelMorph's default
            weight for its NCC loss.
        mind_radius, mind_dilation: MIND-SSC patch half-width and neighbourhood distance,
            label-grid voxels (Heinrich et al.: 1 and 2).
        ncc_radius: half-width of the local NCC window, label-grid voxels (9^3 window).
        pipeline: the registration model (network, optimiser, refinement, preprocessing).
    """

    stages: int = 8
    iterations: int = 1000
    batch_size: int = 2
    lr: float = 1e-3
    lr_min: float = 1e-5
    seed: int = 0
    supervision: str = "pseudo"
    augment: bool = True
    aug_linear_std: float = 0.075
    aug_translation_std: float = 0.075
    aug_relative_std: float = 0.05
    refine: bool = True
    weighted_sampling: bool = True
    sampling_logit_range: float = SAMPLING_LOGIT_RANGE
    label_stride: int = 2
    loss_border: int = 8
    amp: bool = True
    cpu_bf16: bool = False
    train_images: str = "held-out"
    directions: str = "one"
    max_train_pairs: int | None = None
    metric_reg_weight: float = 1.0
    mind_radius: int = 1
    mind_dilation: int = 2
    ncc_radius: int = 4
    pipeline: DensePipelineConfig = field(default_factory=DensePipelineConfig)

    def validate(self) -> "DenseCycleConfig":
        """Every setting checked by type and range (a run.json edited by hand reaches here unchecked otherwise: a
        text lr was a TypeError mid-stage, augment "no" counted as on, a NaN spread trained to NaN)."""
        from cyclereg.errors import require_config_fields, require_config_seed

        require_config_seed(self.seed)
        require_config_fields(
            self, counts={"stages": 1, "iterations": 1, "batch_size": 1, "label_stride": 1, "loss_border": 0,
                          "mind_radius": 0, "mind_dilation": 1, "ncc_radius": 0},
            optional_counts=("max_train_pairs",), switches=("augment", "refine", "weighted_sampling", "amp", "cpu_bf16"),
            numbers={"lr": True, "lr_min": False, "aug_linear_std": False, "aug_translation_std": False,
                     "aug_relative_std": False, "sampling_logit_range": False, "metric_reg_weight": False})
        if self.supervision not in SUPERVISIONS:
            raise ValueError(f"supervision: expected one of {SUPERVISIONS}, got {self.supervision!r}")
        if self.train_images not in ("held-out", "all"):
            raise ValueError(f"train_images: expected 'held-out' or 'all', got {self.train_images!r}")
        if self.directions not in ("one", "both"):
            raise ValueError(f"directions: expected 'one' or 'both', got {self.directions!r}")
        if self.pipeline.net.downsampling % self.label_stride:
            raise ValueError("label_stride must divide the network's downsampling")
        self.pipeline.validate()
        return self

    @staticmethod
    def from_dict(d: dict) -> "DenseCycleConfig":
        from cyclereg.dense.config import config_from_dict

        d = dict(d)
        pipeline = config_from_dict(d.pop("pipeline", None))
        return DenseCycleConfig(pipeline=pipeline, **d).validate()


# ----------------------------------------------------------------------------- augmentation
def random_pair_affines(generator: torch.Generator, cfg: DenseCycleConfig, shape, spacing_mm
                        ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Random voxel-space affine maps ``x -> A x + b`` (image voxels) for the fixed and the
    moving image of one pair (float64). The perturbations act on millimetre coordinates
    about the volume centre, so anisotropic voxels are handled correctly."""
    grid = centred_affine(tuple(shape), spacing_mm)  # mm about the volume centre
    half_extent_mm = -grid[:3, 3]  # centre to the centre of the last voxel, per axis

    def draw(std):
        return torch.eye(3, dtype=torch.float64) + std * torch.randn(3, 3, generator=generator, dtype=torch.float64)

    A_fix = draw(cfg.aug_linear_std)
    t_fix = cfg.aug_translation_std * torch.randn(3, generator=generator, dtype=torch.float64) * half_extent_mm
    R = draw(cfg.aug_relative_std)
    t_rel = cfg.aug_relative_std * torch.randn(3, generator=generator, dtype=torch.float64) * half_extent_mm
    A_mov, t_mov = R @ A_fix, R @ t_fix + t_rel

    return world_map_to_voxel(A_fix, t_fix, grid), world_map_to_voxel(A_mov, t_mov, grid)


def affine_field(A: torch.Tensor, b: torch.Tensor, shape, stride: int = 1, *, device=None,
                 dtype=torch.float32) -> torch.Tensor:
    """Displacement ``(1, 3, *shape)`` of the image-voxel map ``x -> A x + b`` on a grid whose
    voxel ``y`` is image voxel ``stride * y``, in voxels of that grid: ``(A (s y) + b) / s - y``."""
    y = voxel_coordinates(tuple(shape), device=device, dtype=torch.float64)  # (D, H, W, 3)
    A, b = A.to(device=device, dtype=torch.float64), b.to(device=device, dtype=torch.float64)
    mapped = y @ A.T + b / stride
    return (mapped - y).permute(3, 0, 1, 2).unsqueeze(0).to(dtype)


def transform_target(label: torch.Tensor, fix_map, mov_map, stride: int) -> torch.Tensor:
    """The pseudo label ``u`` ``(1, 3, d, h, w)`` (label-grid voxels) of the augmented pair.

    Augmented images: ``F'(x) = F(T_f x)``, ``M'(x) = M(T_m x)``. A fixed point ``y``
    corresponds to ``T_f y + u(T_f y)`` in the original moving image, i.e. to
    ``T_m^-1(T_f y + u(T_f y))`` in ``M'``; returns that minus ``y``.
    """
    shape = tuple(label.shape[2:])
    dev, dt = label.device, label.dtype
    d_fix = affine_field(*fix_map, shape, stride, device=dev, dtype=dt)
    u_at = warp_unchecked(label, d_fix)  # u(T_f y)
    y = voxel_coordinates(shape, device=dev, dtype=torch.float64).permute(3, 0, 1, 2).unsqueeze(0)
    z = y + d_fix.double() + u_at.double()  # T_f y + u(T_f y)
    A_m, b_m = (t.to(device=dev, dtype=torch.float64) for t in mov_map)
    zz = z[0].permute(1, 2, 3, 0) - b_m / stride
    back = zz @ torch.linalg.inv(A_m).T
    return (back.permute(3, 0, 1, 2).unsqueeze(0) - y).to(dt)


def strided(image: torch.Tensor, stride: int) -> torch.Tensor:
    """Average of the ``(2s-1)^3`` neighbourhood centred on every ``s``-th voxel
    (the label grid of :class:`DenseCycleConfig`)."""
    if stride == 1:
        return image
    return F.avg_pool3d(image, 2 * stride - 1, stride=stride, padding=stride - 1, count_include_pad=False)


# ----------------------------------------------------------------------------- task
@dataclass
class VolumeImage:
    """One preprocessed training image ``(1, 1, D, H, W)`` (CPU) and its id, unique among the
    training images (:func:`cyclereg.dense.data.scan_ids`)."""

    id: str
    image: torch.Tensor


class DenseCycleTask:
    """:class:`~cyclereg.training.scheduler.StageTask` for volumes.

    Args:
        images: preprocessed training images, all on one grid shape and spacing.
        pairs: ``(fixed index, moving index)`` into ``images``.
        spacing_mm: voxel size of the images (i, j, k); stored in the model config so a
            trained model rejects volumes of another spacing.
        orientation: axis codes of the images (:func:`cyclereg.volumeio.axis_codes`), stored likewise
            (None: not recorded, any accepted).
    """

    checkpoint_kind = "dense"

    def __init__(self, images: list[VolumeImage], pairs: list[tuple[int, int]], spacing_mm, config: DenseCycleConfig,
                 device: torch.device, orientation: tuple[str, str, str] | None = None):
        if not pairs:
            raise ValueError("pairs: need at least one training pair")
        shapes = {tuple(im.image.shape) for im in images}
        if len(shapes) != 1:
            raise ValueError(f"images: all training images need one shape, got {sorted(shapes)}")
        ids = [im.id for im in images]
        if len(set(ids)) != len(ids):  # pseudo labels and sampling weights are kept by pair id
            raise ValueError(f"images: ids must be unique, got {ids}")
        self.images = images
        self.pairs = pairs
        self._pair_ids = pair_ids([(ids[i], ids[j]) for i, j in pairs])  # labels and weights are kept by these
        self.spacing = tuple(float(s) for s in spacing_mm)
        self.config = config.validate()
        self.pipeline = replace(config.pipeline, spacing_mm=self.spacing,
                                orientation=None if orientation is None else tuple(orientation)).validate()
        self.device = device
        self.shape = tuple(images[0].image.shape[2:])
        s = config.label_stride
        self.label_shape = tuple(-(-n // s) for n in self.shape)
        # voxel -> mm of the label grid (every ``label_stride``-th image voxel), for errors in mm
        self.label_grid = centred_affine(self.label_shape, [s * v for v in self.spacing])

    def pair_id(self, k: int) -> str:
        """Id of training pair ``k``: ``FIXED_MOVING`` of its images' ids, unique among the pairs
        (:func:`cyclereg.dense.data.pair_ids`)."""
        return self._pair_ids[k]

    def label_shapes(self) -> dict[str, tuple[int, ...]] | None:
        """``{pair id: (1, 3, *label grid)}``: the shape of each training pair's pseudo label (the scheduler
        checks stored labels against it); ``None`` without pseudo labels (another supervision)."""
        if self.config.supervision != "pseudo":
            return None
        return {self.pair_id(k): (1, 3, *self.label_shape) for k in range(len(self.pairs))}

    def _autocast(self) -> tuple[bool, bool]:
        """``(float16 autocast, bfloat16 autocast)`` of training on the task's device: ``amp`` acts on CUDA
        only, ``cpu_bf16`` on the CPU only."""
        return self.config.amp and self.device.type == "cuda", self.config.cpu_bf16 and self.device.type == "cpu"

    def ran_on(self, stage: int) -> dict:
        """:meth:`~cyclereg.training.scheduler.StageTask.ran_on`: the device, and the training precision
        (stage 0 trains nothing: ``None``)."""
        fp16, bf16 = self._autocast()
        precision = "float16 autocast" if fp16 else "bfloat16 autocast" if bf16 else "float32"
        return {"device": str(self.device), "training_precision": precision if stage >= 1 else None}

    def new_model(self, stage: int) -> FeatureNet:
        # stage 1 starts from a different random initialisation than stage 0 (paper Sec. 2.2)
        with torch.random.fork_rng(devices=[]):  # torch's default layer initialisation, replaced: leave the caller's RNG be
            net = init_random(FeatureNet(self.pipeline.net), initial_network_seed(self.config.seed, stage))
        return net.eval().to(self.device)

    def model_config(self) -> DensePipelineConfig:
        return self.pipeline

    def _image(self, idx: int) -> torch.Tensor:
        return self.images[idx].image.to(self.device)

    # ------------------------------------------------------------------ metrics
    def _interior(self, field: torch.Tensor) -> torch.Tensor:
        b = self.config.loss_border
        if b <= 0 or any(n <= 2 * b for n in field.shape[2:]):
            return field
        return field[:, :, b:-b, b:-b, b:-b]

    def label_error_mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Mean Euclidean distance [mm] between two label-grid fields over the interior."""
        diff = voxel_disp_to_mm(self._interior(a.float() - b.float()), self.label_grid)
        return diff.pow(2).sum(1).add(1e-12).sqrt().mean()

    # ------------------------------------------------------------------ pseudo labels
    @torch.no_grad()
    def pseudo_label(self, model: FeatureNet, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Network output and (refined) pseudo label of pair ``k`` on the label grid."""
        cfg = self.config
        model.eval()
        i, j = self.pairs[k]
        f, m = self._image(i), self._image(j)
        raw = predict_displacement(model, f, m, self.pipeline, stride=cfg.label_stride)
        if not cfg.refine:
            return raw, raw
        full = register(f, m, model, self.pipeline)
        return raw, resample_disp(full, self.label_shape, float(cfg.label_stride))

    def _label_part(self, model, k: int) -> dict:
        """Pseudo label of pair ``k`` (float16, CPU) with its disagreement and mean length [mm]."""
        raw, ref = self.pseudo_label(model, k)
        return {"label": ref.to(torch.float16).cpu(), "disagreement": self.label_error_mm(raw, ref).item(),
                "magnitude": self.label_error_mm(ref, torch.zeros_like(ref)).item()}

    def make_pseudo_labels(self, model, stage: int, progress=None, parts: LabelParts | None = None
                           ) -> tuple[dict, dict]:
        if self.config.supervision != "pseudo":
            return {}, {"weights": {self.pair_id(k): 1.0 for k in range(len(self.pairs))}, "stats": {}}
        labels, disagreement, magnitude = {}, {}, []
        task = progress.add_task(f"stage {stage}: pseudo labels", total=len(self.pairs)) if progress else None
        for k in range(len(self.pairs)):
            pid = self.pair_id(k)
            part = LabelParts.get_or_make(parts, pid, lambda: self._label_part(model, k))
            labels[pid] = part["label"]
            disagreement[pid] = part["disagreement"]
            magnitude.append(part["magnitude"])
            if progress:
                progress.advance(task)
        if progress:
            progress.remove_task(task)
        stats = {"pseudo_label_disagreement_mm": sum(disagreement.values()) / len(disagreement),
                 "mean_pseudo_displacement_mm": sum(magnitude) / len(magnitude)}
        return labels, {"weights": self.sampling_weights(disagreement), "stats": stats}

    def label_change_mm(self, old: dict, new: dict) -> float | None:
        """Mean distance [mm] between two stages' labels (``{pair id: (1, 3, *label grid)}``,
        voxels of the label grid) over the pairs both hold: per pair the mean over the interior
        voxels (:meth:`label_error_mm`), then the mean over pairs."""
        return mean_label_change(old, new, lambda a, b: self.label_error_mm(b, a).item())

    def sampling_weights(self, disagreement: dict[str, float]) -> dict[str, float]:
        """Rank pairs by disagreement; sigmoid of arguments from +r (lowest) to -r (highest)."""
        return difficulty_weights(disagreement, enabled=self.config.weighted_sampling,
                                  logit_range=self.config.sampling_logit_range)

    # ------------------------------------------------------------------ training
    def _batch(self, idx: list[int], labels: dict, g: torch.Generator):
        cfg = self.config
        fixed, moving, targets = [], [], []
        for k in idx:
            i, j = self.pairs[k]
            f, m = self._image(i), self._image(j)
            target = labels[self.pair_id(k)].to(self.device).float() if labels else None
            if cfg.augment:
                fix_map, mov_map = random_pair_affines(g, cfg, self.shape, self.spacing)
                f = warp_unchecked(f, affine_field(*fix_map, self.shape, device=f.device, dtype=f.dtype))
                m = warp_unchecked(m, affine_field(*mov_map, self.shape, device=m.device, dtype=m.dtype))
                if target is not None:
                    target = transform_target(target, fix_map, mov_map, cfg.label_stride)
            fixed.append(f)
            moving.append(m)
            targets.append(target)
        tgt = torch.cat(targets) if labels else None
        return torch.cat(fixed), torch.cat(moving), tgt

    def _loss(self, model, fixed, moving, target) -> torch.Tensor:
        cfg = self.config
        pred = predict_displacement(model, fixed, moving, self.pipeline, stride=cfg.label_stride)
        if cfg.supervision == "pseudo":
            return self.label_error_mm(pred, target)
        pred = pred.float()
        f_s = strided(fixed, cfg.label_stride).float()
        warped = warp_unchecked(strided(moving, cfg.label_stride).float(), pred)
        if cfg.supervision == "mind":
            sim = mind_loss(f_s, warped, radius=cfg.mind_radius, dilation=cfg.mind_dilation)
        else:
            sim = ncc_loss(f_s, warped, radius=cfg.ncc_radius)
        return sim + cfg.metric_reg_weight * diffusion_regularizer(pred)

    def train_stage(self, model, labels: dict, weights: dict, stage: int, progress=None,
                    snapshot: StageSnapshot | None = None) -> dict:
        """One stage of training (``iterations`` steps; a step of a ``snapshot`` is an iteration)."""
        cfg = self.config
        if cfg.supervision == "pseudo" and not labels:
            raise ValueError("no pseudo labels to train on")
        g = training_generator(cfg.seed, stage)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.iterations, eta_min=cfg.lr_min)
        use_amp, use_bf16 = self._autocast()
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        w = torch.tensor([weights.get(self.pair_id(k), 1.0) for k in range(len(self.pairs))], dtype=torch.float64)
        start, losses = 0, []
        if snapshot is not None:
            start, losses = snapshot.restore(cfg.iterations, model=model, optimizer=opt, lr_schedule=sched,
                                             generator=g, scaler=scaler, progress=progress, unit="iteration")
        task = (progress.add_task(f"stage {stage}: training", total=cfg.iterations, completed=start)
                if progress else None)
        model.train()
        for it in range(start, cfg.iterations):
            idx = torch.multinomial(w, cfg.batch_size, replacement=True, generator=g).tolist()
            with torch.no_grad():
                fixed, moving, target = self._batch(idx, labels, g)
            opt.zero_grad(set_to_none=True)
            autocast = (torch.autocast(device_type="cuda", dtype=torch.float16) if use_amp
                        else torch.autocast(device_type="cpu", dtype=torch.bfloat16) if use_bf16
                        else contextlib.nullcontext())
            with autocast:
                loss = self._loss(model, fixed, moving, target)
            loss = loss.float()  # the logged figure at float32 precision (a cast; gradients flow through)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            losses.append(loss.item())
            if snapshot is not None:
                snapshot.offer(it + 1, model=model, optimizer=opt, lr_schedule=sched, generator=g, losses=losses,
                               scaler=scaler)
            if progress:
                tail = losses[-PROGRESS_LOSS_ITERATIONS:]
                progress.update(task, advance=1,
                                description=f"stage {stage}: training (loss {sum(tail) / len(tail):.3f})")
        if progress:
            progress.remove_task(task)
        model.eval()
        tail = losses[-max(1, min(LOGGED_LOSS_MAX_ITERATIONS, cfg.iterations // LOGGED_LOSS_FRACTION)):]
        key = "train_loss_mm" if cfg.supervision == "pseudo" else f"train_loss_{cfg.supervision}"
        return {key: sum(tail) / len(tail), "iterations": cfg.iterations}
