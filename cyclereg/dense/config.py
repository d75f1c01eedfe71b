"""Frozen configuration of the dense (image volume) registration path.

Every magic number of the pipeline lives here, with its unit and its origin:

* "paper" = Bigalke et al., MICCAI 2023, Sec. 2.3.1 / 3.1;
* "reference" = behaviour of the authors' public code (multimodallearning/
  reg-cyclical-self-train: ``coupled_convex.py``, ``adam_instance_opt.py``,
  ``registration_pipeline.py``, ``data_utils.py``), re-implemented here, not copied;
* "chosen here" = a value this package had to pick, with the reason.

Units: displacements are in voxels of the grid they live on (the feature grid for the
convex optimiser, the Adam grid for instance optimisation, the image grid otherwise).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cyclereg.errors import finite_number, whole_number


@dataclass(frozen=True)
class FeatureNetConfig:
    """The feature network ``g`` (paper Sec. 2.3.1).

    Attributes:
        in_channels: image channels (1 for CT / T1 MRI).
        channels: output channels of the six 3x3x3 convolutions (paper: "32, 64, or 128").
            The exact sequence follows the reference network (32, 64, then 128s), with a
            64-channel third convolution added so that there are six as the paper states.
        strides: stride of each convolution. "Every second convolution contains a stride
            of 2, yielding a downsampling factor of 8" (paper); the reference strides the
            first of each pair, which puts the second convolution (the Adam features) at
            half resolution with 64 channels exactly as in the reference.
        kernel_size: spatial kernel of the six convolutions, voxels.
        out_channels: channels of the final 1x1x1 convolution (paper: 16).
        adam_layer: the instance-optimisation features are taken after this many
            conv+BN+ReLU blocks (paper: "after the second convolution block").
        adam_channels: the 1x1x1 projection of those features (paper: 16; reference: 32).
        random_init: initialisation of a fresh ("random") network. ``"kaiming"``: He-normal
            weights (fan-in, ReLU gain) and zero biases, chosen here because it keeps the
            activation scale constant through the depth so random features do not fade
            into the biases; ``"torch"``: PyTorch's default initialisation (the reference).
    """

    in_channels: int = 1
    channels: tuple[int, ...] = (32, 64, 64, 128, 128, 128)
    strides: tuple[int, ...] = (2, 1, 2, 1, 2, 1)
    kernel_size: int = 3
    out_channels: int = 16
    adam_layer: int = 2
    adam_channels: int = 16
    random_init: str = "kaiming"

    @property
    def downsampling(self) -> int:
        """Total stride (8 with the defaults)."""
        f = 1
        for s in self.strides:
            f *= s
        return f

    @property
    def adam_downsampling(self) -> int:
        """Stride of the instance-optimisation features (2 with the defaults)."""
        f = 1
        for s in self.strides[: self.adam_layer]:
            f *= s
        return f


@dataclass(frozen=True)
class ConvexConfig:
    """Optimiser ``h``: correlation layer + coupled convex optimisation (+ inverse consistency).

    Attributes:
        radius: half-width of the displacement search window in feature voxels; 2 gives
            the 5x5x5 = 125 discrete displacements of the paper (reference ``disp_hw=2``).
            With the 8x downsampling one feature voxel is 8 image voxels.
        normalize_features: standardise every feature channel of each volume to zero mean
            and unit standard deviation before the correlation (chosen here): the cost
            then has a fixed dynamic range whatever the scale of the network's features,
            which is what makes random (stage-0) features usable.
        feature_scale: features are multiplied by this before the correlation
            (reference: 5; here 1 because the features are standardised instead).
        patch_size: the per-displacement cost is averaged over this cubic patch, voxels of
            the feature grid (reference: 3).
        cost_reduction: ``"mean"`` over channels of ``|f - m|`` (chosen here, so the
            cost is in units of one channel's standard deviation, ~1.13 for unrelated
            unit features) or ``"sum"`` (reference).
        softmax_temperature: ``delta`` of ``softmax(-delta * cost)`` in the soft argmin
            (reference: 20), dimensionless (the cost is dimensionless). Despite the name (kept
            for stored configurations) an *inverse* temperature: larger = sharper.
        coupling: coefficients of the squared distance (feature voxels^2) between each
            candidate displacement and the smoothed field, one coupled iteration each
            (reference: 0.003, 0.03, 0.3).
        smooth_kernel: box filter applied to the field after every coupled iteration,
            feature voxels (reference: 3).
        ic_iterations: fixed-point iterations of forward/backward inverse consistency
            (reference: 15 in the optimiser ``h``).
        upsample_smooth_passes: box-filter passes after each 2x upsampling step of the
            field (reference: 2).
        upsample_smooth_kernel: width of those box filters, voxels of the finer grid
            (reference: 3).
    """

    radius: int = 2
    normalize_features: bool = True
    feature_scale: float = 1.0
    patch_size: int = 3
    cost_reduction: str = "mean"
    softmax_temperature: float = 20.0
    coupling: tuple[float, ...] = (0.003, 0.03, 0.3)
    smooth_kernel: int = 3
    ic_iterations: int = 15
    upsample_smooth_passes: int = 2
    upsample_smooth_kernel: int = 3


@dataclass(frozen=True)
class AdamConfig:
    """Instance optimisation of the final field with Adam (paper Sec. 2.3.1, reference
    ``adam_instance_opt.py``).

    The field is optimised on the grid of the ``adam_layer`` features (half resolution
    with the defaults; reference ``grid_sp=2``), in voxels of that grid.

    Attributes:
        iterations: Adam steps (reference: 50).
        lr: Adam learning rate, voxels of the Adam grid per step (reference: 1).
        smooth_passes: box-filter passes applied to the parameters in every step
            (a cheap B-spline-like parametrisation; reference: 3).
        smooth_kernel: width of the box filters of ``smooth_passes`` (voxels of the Adam
            grid) and of ``final_smooth_passes`` (voxels of the full grid) (reference: 3).
        reg_weight: weight of the diffusion regulariser, the mean squared forward
            difference of the smoothed field per axis (reference ``lambda_weight``: 0.65).
        reg_factor: extra multiplier of the regulariser (reference ``reg_fac``, default 1).
        data_weight: weight of the mean squared difference of the (standardised) projected
            features. Reference: 12 on features scaled by 5, i.e. 300 on raw features
            whose scale depends on the network. Chosen here for standardised features:
            1.0, i.e. the data term of a totally unrelated pair (~2) against the
            regulariser; a principled, untuned order of magnitude.
        normalize_features: standardise the projected features per channel (as the convex
            optimiser does).
        final_smooth_passes: box-filter passes on the full-resolution result
            (reference: 3).
    """

    iterations: int = 50
    lr: float = 1.0
    smooth_passes: int = 3
    reg_weight: float = 0.65
    reg_factor: float = 1.0
    data_weight: float = 1.0
    normalize_features: bool = True
    final_smooth_passes: int = 3
    smooth_kernel: int = 3


@dataclass(frozen=True)
class PreprocessConfig:
    """Intensity preprocessing.

    Attributes:
        mode: ``"auto"`` (CT when the volume's minimum is below ``auto_ct_below_hu``,
            otherwise MRI), ``"ct"``, ``"mri"`` or ``"none"``.
        ct_scale_hu: CT intensities are divided by this (reference: 500 HU).
        ct_clip: the scaled CT is clipped to this range (reference: -0.4, 0.6, i.e. a
            window of -200 to 300 HU).
        mri_percentiles: MRI intensities are mapped linearly so that these percentiles
            (of the whole volume) become 0 and 1, then clipped to [0, 1] (chosen here:
            1 and 99, robust to a few bright voxels).
        auto_ct_below_hu: threshold of the ``auto`` mode: CT volumes contain air at about
            -1000 HU, MRI volumes are non-negative.
    """

    mode: str = "auto"
    ct_scale_hu: float = 500.0
    ct_clip: tuple[float, float] = (-0.4, 0.6)
    mri_percentiles: tuple[float, float] = (1.0, 99.0)
    auto_ct_below_hu: float = -200.0


@dataclass(frozen=True)
class DensePipelineConfig:
    """Everything that defines a dense registration.

    Attributes:
        net: feature network.
        convex: correlation + coupled convex optimiser.
        adam: instance optimisation.
        preprocess: intensity preprocessing.
        warps: 1 or 2 passes of the network+optimiser (paper's final setting: 2).
        use_ic: forward-backward inverse consistency (reference test setting: on).
        use_adam: Adam instance optimisation (paper's final setting: on).
        pad_multiple: volumes are padded (replicate, at the far end of every axis) to a
            multiple of this many voxels internally; must be a multiple of the network's
            downsampling.
        spacing_mm: voxel size (i, j, k) the model was trained for, or None to accept any
            spacing (a random network). Inputs whose spacing differs by more than
            ``spacing_tolerance`` (relative) are rejected.
        spacing_tolerance: relative tolerance of the spacing check.
        orientation: where the voxel axes (i, j, k) of the training images point, as nibabel's axis
            codes (e.g. ``("R", "A", "S")``: :func:`cyclereg.volumeio.axis_codes`), or None to accept any
            (a random network, or a model trained before this was recorded). The network learnt features
            of the voxel arrays, which a flip or an axis permutation changes: inputs stored otherwise are
            rejected.
    """

    net: FeatureNetConfig = field(default_factory=FeatureNetConfig)
    convex: ConvexConfig = field(default_factory=ConvexConfig)
    adam: AdamConfig = field(default_factory=AdamConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    warps: int = 2
    use_ic: bool = True
    use_adam: bool = True
    pad_multiple: int = 8
    spacing_mm: tuple[float, float, float] | None = None
    spacing_tolerance: float = 0.01
    orientation: tuple[str, str, str] | None = None

    def replace(self, **changes: Any) -> "DensePipelineConfig":
        """A copy with the given top-level fields changed (``None`` values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def validate(self) -> "DensePipelineConfig":
        if not whole_number(self.warps) or self.warps not in (1, 2):  # True == 1 and 2.0 == 2 to Python
            raise ValueError(f"warps must be 1 or 2, got {self.warps!r}")
        for prefix, part in (("", self), ("net.", self.net), ("convex.", self.convex), ("adam.", self.adam),
                             ("preprocess.", self.preprocess)):
            for f in dataclasses.fields(part):  # the on/off settings: "no" or 0 (an edited stored config) is no switch
                if f.type in ("bool", bool) and not isinstance(getattr(part, f.name), bool):
                    raise ValueError(f"{prefix}{f.name}: expected true or false, got {getattr(part, f.name)!r}")
        if len(self.net.channels) != len(self.net.strides):
            raise ValueError("net.channels and net.strides must have the same length")
        if any(not whole_number(s) or s not in (1, 2) for s in self.net.strides):
            # the fields are upsampled in steps of 2 (convex.upsample_field, resample_disp)
            raise ValueError(f"net.strides: each must be 1 or 2, got {tuple(self.net.strides)}")
        if whole_number(self.pad_multiple) and self.pad_multiple % self.net.downsampling:  # no count: named below
            raise ValueError("pad_multiple must be a multiple of the network's downsampling")
        if not whole_number(self.net.adam_layer) or not 1 <= self.net.adam_layer <= len(self.net.channels):
            raise ValueError(f"net.adam_layer out of range: expected a whole number from 1 to "
                             f"{len(self.net.channels)}, got {self.net.adam_layer!r}")
        if self.convex.cost_reduction not in ("mean", "sum"):
            raise ValueError(f"convex.cost_reduction: expected mean|sum, got {self.convex.cost_reduction}")
        for name, width in (("convex.patch_size", self.convex.patch_size),
                            ("convex.smooth_kernel", self.convex.smooth_kernel),
                            ("convex.upsample_smooth_kernel", self.convex.upsample_smooth_kernel),
                            ("adam.smooth_kernel", self.adam.smooth_kernel)):
            if not whole_number(width) or width < 1 or width % 2 == 0:  # an even box filter: a half-voxel shift
                raise ValueError(f"{name}: expected an odd width >= 1 (1: no smoothing), got {width!r}")
        if self.preprocess.mode not in ("auto", "ct", "mri", "none"):
            raise ValueError(f"preprocess.mode: expected auto|ct|mri|none, got {self.preprocess.mode}")
        for name, count, least in (("pad_multiple", self.pad_multiple, 1),
                                   ("net.in_channels", self.net.in_channels, 1),
                                   *((f"net.channels[{i}]", c, 1) for i, c in enumerate(self.net.channels)),
                                   ("net.kernel_size", self.net.kernel_size, 1),
                                   ("net.out_channels", self.net.out_channels, 1),
                                   ("net.adam_channels", self.net.adam_channels, 1),
                                   ("convex.radius", self.convex.radius, 1),
                                   ("convex.ic_iterations", self.convex.ic_iterations, 0),
                                   ("convex.upsample_smooth_passes", self.convex.upsample_smooth_passes, 0),
                                   ("adam.iterations", self.adam.iterations, 0),
                                   ("adam.smooth_passes", self.adam.smooth_passes, 0),
                                   ("adam.final_smooth_passes", self.adam.final_smooth_passes, 0)):
            if not whole_number(count) or count < least:
                raise ValueError(f"{name}: expected a whole number >= {least}, got {count!r}")
        for name, value, positive in (("convex.softmax_temperature", self.convex.softmax_temperature, True),
                                      ("convex.feature_scale", self.convex.feature_scale, True),
                                      ("adam.lr", self.adam.lr, True),
                                      ("adam.reg_weight", self.adam.reg_weight, False),
                                      ("adam.reg_factor", self.adam.reg_factor, False),
                                      ("adam.data_weight", self.adam.data_weight, False),
                                      ("spacing_tolerance", self.spacing_tolerance, False),
                                      ("preprocess.ct_scale_hu", self.preprocess.ct_scale_hu, True),
                                      *((f"convex.coupling[{i}]", c, False)
                                        for i, c in enumerate(self.convex.coupling)),
                                      *((f"spacing_mm[{i}]", v, True) for i, v in enumerate(self.spacing_mm or ()))):
            if not finite_number(value) or value < 0 or (positive and value == 0):
                raise ValueError(f"{name}: expected a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
        pre = self.preprocess
        if not finite_number(pre.auto_ct_below_hu):
            raise ValueError(f"preprocess.auto_ct_below_hu: expected a finite number, got {pre.auto_ct_below_hu!r}")
        for name, pair, bounds in (("preprocess.ct_clip", pre.ct_clip, None),
                                   ("preprocess.mri_percentiles", pre.mri_percentiles, (0.0, 100.0))):
            lo, hi = tuple(pair) if isinstance(pair, (tuple, list)) and len(pair) == 2 else (None, None)
            if not (finite_number(lo) and finite_number(hi) and lo < hi
                    and (bounds is None or bounds[0] <= lo and hi <= bounds[1])):
                within = "" if bounds is None else f" within [{bounds[0]:g}, {bounds[1]:g}]"
                raise ValueError(f"{name}: expected two finite numbers low < high{within}, got {pair!r}")
        if self.spacing_mm is not None and len(self.spacing_mm) != 3:
            raise ValueError(f"spacing_mm: expected three voxel sizes (i, j, k) or none, got {self.spacing_mm!r}")
        if self.orientation is not None and (len(self.orientation) != 3 or sorted(
                {"L": "R", "P": "A", "I": "S"}.get(c, c) for c in self.orientation) != ["A", "R", "S"]):
            raise ValueError(f"orientation: expected three axis codes such as ('R', 'A', 'S') or none, got "
                             f"{self.orientation!r}")
        return self


def _build(cls, obj):
    if obj is None:
        return cls()
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(obj) - known)
    if unknown:  # a setting this version does not have: ignoring it would register differently
        raise ValueError(f"unknown {cls.__name__} setting(s) {', '.join(unknown)} (written by a newer cyclereg?)")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in obj:
            continue
        v = obj[f.name]
        if isinstance(v, list):
            v = tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)


def config_from_dict(obj: dict | None) -> DensePipelineConfig:
    """Rebuild a :class:`DensePipelineConfig` from its JSON form (missing keys -> defaults)."""
    obj = dict(obj or {})
    sub = {
        "net": _build(FeatureNetConfig, obj.pop("net", None)),
        "convex": _build(ConvexConfig, obj.pop("convex", None)),
        "adam": _build(AdamConfig, obj.pop("adam", None)),
        "preprocess": _build(PreprocessConfig, obj.pop("preprocess", None)),
    }
    top = _build(DensePipelineConfig, obj)
    return dataclasses.replace(top, **sub).validate()
