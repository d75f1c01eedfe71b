"""Embedded default data: lung-shaped keypoint clouds under a breathing-like deformation.

Two ellipsoidal "lungs" hold a random branching "vessel tree"; the fixed (exhale) cloud
samples points along it, the moving (inhale) cloud samples *other* points along the same
tree (so no point has an exact partner, as with real keypoints) and maps them through the
known deformation. The ground truth is the displacement ``u(p)`` at every fixed point
(fixed -> moving, mm).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class BreathingConfig:
    """Synthetic pair settings (all lengths in mm).

    Attributes:
        lung_centres: (x, y, z) centres of the two lungs.
        lung_radii: ellipsoid semi-axes (x, y, z) of each lung.
        branches: number of vessel branches per lung.
        steps: random-walk steps per branch.
        step_mm: length of one step.
        start_spread: the branches start uniformly in a box this many lung radii wide per axis, centred
            on the lung's centre, and inside the lung (a start outside it is drawn again).
        walk_turn: how strongly a walk turns per step: the standard deviation of the random change of its
            unit direction.
        n_fixed: points in the fixed cloud.
        n_moving: points in the moving cloud.
        stretch: relative inhale expansion along (x, y, z) about the lung apex.
        random_amplitude: peak amplitude of the smooth random part of the motion.
        random_width: Gaussian width of its radial basis functions.
        random_bases: number of radial basis functions.
        random_centre_extent: their centres are drawn uniformly within this many lung radii (x, y, z) of
            the lungs' common centre.
        jitter: detection noise added to every point.
    """

    lung_centres: tuple[tuple[float, float, float], ...] = ((75.0, 95.0, 160.0), (175.0, 95.0, 160.0))
    lung_radii: tuple[float, float, float] = (45.0, 65.0, 120.0)
    branches: int = 60
    steps: int = 40
    step_mm: float = 3.0
    start_spread: float = 1.0
    walk_turn: float = 0.5
    n_fixed: int = 1500
    n_moving: int = 3000
    stretch: tuple[float, float, float] = (0.03, 0.05, 0.09)
    random_amplitude: float = 3.0
    random_width: float = 60.0
    random_bases: int = 8
    random_centre_extent: tuple[float, float, float] = (2.0, 1.0, 1.0)
    jitter: float = 0.3

    def scaled_motion(self, factor: float) -> "BreathingConfig":
        """The same pair with ``factor`` times the motion: the expansion and the random part are
        both scaled, so every ground-truth displacement is ``factor`` times the original one
        (same seed, same clouds before the motion)."""
        return replace(self, stretch=tuple(s * factor for s in self.stretch),
                       random_amplitude=self.random_amplitude * factor)


@dataclass(frozen=True)
class SyntheticPair:
    fixed_mm: torch.Tensor
    moving_mm: torch.Tensor
    displacement_mm: torch.Tensor
    """``(N, 3)`` ground-truth displacement at each fixed point."""


def _inside(p: torch.Tensor, cfg: BreathingConfig) -> torch.Tensor:
    r = torch.tensor(cfg.lung_radii, dtype=p.dtype)
    ok = torch.zeros(p.shape[0], dtype=torch.bool)
    for c in cfg.lung_centres:
        ok |= (((p - torch.tensor(c, dtype=p.dtype)) / r) ** 2).sum(1) <= 1.0
    return ok


START_DRAWS = 1000
"""Draws of a branch start in the ``start_spread`` box until one lies inside the lung (with the default
box, every first draw does: the box's corners are sqrt(3) / 2 radii from the centre)."""


def _vessel_tree(cfg: BreathingConfig, g: torch.Generator) -> torch.Tensor:
    """Polyline vertices ``(B, S, 3)`` of random smooth walks inside the lungs."""
    walks = []
    r = torch.tensor(cfg.lung_radii, dtype=torch.float64)
    for c in cfg.lung_centres:
        centre = torch.tensor(c, dtype=torch.float64)
        for _ in range(cfg.branches):
            for _ in range(START_DRAWS):  # a start outside the lung (a box wider than 2 / sqrt(3) radii) is redrawn
                start = centre + (torch.rand(3, generator=g, dtype=torch.float64) - 0.5) * (r * cfg.start_spread)
                if _inside(start[None], cfg)[0]:
                    break
            else:
                raise ValueError(f"start_spread={cfg.start_spread}: no branch start inside the lung in {START_DRAWS} "
                                 "draws")
            direction = torch.randn(3, generator=g, dtype=torch.float64)
            pts = [start]
            for _ in range(cfg.steps - 1):
                direction = direction / direction.norm() + cfg.walk_turn * torch.randn(3, generator=g,
                                                                                        dtype=torch.float64)
                nxt = pts[-1] + cfg.step_mm * direction / direction.norm()
                if not _inside(nxt[None], cfg)[0]:
                    direction = centre - pts[-1]
                    nxt = pts[-1] + cfg.step_mm * direction / direction.norm()
                pts.append(nxt)
            walks.append(torch.stack(pts))
    return torch.stack(walks)


def _sample_on(tree: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    b = torch.randint(tree.shape[0], (n,), generator=g)
    s = torch.randint(tree.shape[1] - 1, (n,), generator=g)
    t = torch.rand(n, 1, generator=g, dtype=tree.dtype)
    return tree[b, s] * (1 - t) + tree[b, s + 1] * t


def breathing_field(points: torch.Tensor, cfg: BreathingConfig, field_seed: int) -> torch.Tensor:
    """Displacement ``(N, 3)`` mm at ``points``: expansion about the apex plus smooth random RBFs."""
    pts = points.double()
    centre = torch.tensor(cfg.lung_centres, dtype=torch.float64).mean(0)
    apex = centre.clone()
    apex[2] += cfg.lung_radii[2]
    u = (pts - apex) * torch.tensor(cfg.stretch, dtype=torch.float64)
    g = torch.Generator().manual_seed(field_seed)
    extent = torch.tensor(cfg.random_centre_extent, dtype=torch.float64)
    lo = centre - torch.tensor(cfg.lung_radii, dtype=torch.float64) * extent
    span = torch.tensor(cfg.lung_radii, dtype=torch.float64) * (2 * extent)
    for _ in range(cfg.random_bases):
        c = lo + torch.rand(3, generator=g, dtype=torch.float64) * span
        a = (torch.rand(3, generator=g, dtype=torch.float64) * 2 - 1) * cfg.random_amplitude
        w = torch.exp(-((pts - c) ** 2).sum(1, keepdim=True) / (2 * cfg.random_width ** 2))
        u = u + w * a
    return u


def make_breathing_pair(seed: int = 0, config: BreathingConfig = BreathingConfig()) -> SyntheticPair:
    """A reproducible synthetic exhale/inhale keypoint pair with known displacements."""
    g = torch.Generator().manual_seed(seed)
    tree = _vessel_tree(config, g)
    fixed = _sample_on(tree, config.n_fixed, g)
    material = _sample_on(tree, config.n_moving, g)
    u_fixed = breathing_field(fixed, config, seed + 1)
    moving = material + breathing_field(material, config, seed + 1)
    fixed = fixed + config.jitter * torch.randn(fixed.shape, generator=g, dtype=fixed.dtype)
    moving = moving + config.jitter * torch.randn(moving.shape, generator=g, dtype=moving.dtype)
    return SyntheticPair(fixed.float(), moving.float(), u_fixed.float())
