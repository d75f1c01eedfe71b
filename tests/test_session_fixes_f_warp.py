"""Contracts of the warp and dense-configuration checks mended in a session of small fixes (2026-12-07).

:func:`cyclereg.warp.warp` (and :func:`cyclereg.warp.warp_labels`, which calls it) of a displacement holding NaN
or inf returned ordinary-looking values quietly (``grid_sample`` samples such a coordinate somewhere); it now
refuses it naming ``disp_vox``. The package's inner loops (inverse consistency, :func:`cyclereg.warp.compose`, the
Adam steps, the training steps) call :func:`cyclereg.warp.warp_unchecked`, the same sampling without that pass over
the field, where a NaN must not stop the loop (training's gradient scaler skips such a step).

``DensePipelineConfig.validate`` took any value of its on/off settings (``use_ic``, ``use_adam``,
``convex.normalize_features``, ``adam.normalize_features``): ``use_ic: "no"`` from an edited stored config counted as
on. It now refuses a value that is not true or false by name; the carried dense run's config still loads.

Each test checks the one-line error naming the argument, and the valid input beside it keeps its exact answer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from cyclereg.dense.config import config_from_dict
from cyclereg.dense.convex import inverse_consistency
from cyclereg.dense.instance import warped_mse_torch
from cyclereg.training.dense import DenseCycleConfig
import cyclereg.warp as warp_mod
from cyclereg.warp import compose, warp, warp_labels


def _ramp() -> torch.Tensor:
    """``(1, 1, 4, 4, 4)`` image whose value is its voxel index along the first axis."""
    return torch.arange(4.0).view(1, 1, 4, 1, 1).expand(1, 1, 4, 4, 4).contiguous()


def _half_voxel_shift() -> torch.Tensor:
    disp = torch.zeros(1, 3, 4, 4, 4)
    disp[:, 0] = 0.5
    return disp


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_warp_refuses_a_displacement_holding_nan_or_inf(bad):
    disp = _half_voxel_shift()
    disp[0, 1, 2, 2, 2] = bad
    with pytest.raises(ValueError, match=r"^disp_vox: holds NaN or inf$"):
        warp(_ramp(), disp)
    with pytest.raises(ValueError, match=r"^disp_vox: holds NaN or inf$"):
        warp_labels(_ramp().long(), disp)
    # the valid field beside it: x + 0.5 along the first axis, the last plane held at the border (3)
    out = warp(_ramp(), _half_voxel_shift())
    torch.testing.assert_close(out[0, 0, :, 1, 2], torch.tensor([0.5, 1.5, 2.5, 3.0]))


def test_warp_unchecked_equals_warp_on_a_finite_field_and_lets_nan_through():
    moving = torch.rand(1, 2, 5, 4, 3, generator=torch.Generator().manual_seed(0))
    disp = torch.rand(1, 3, 5, 4, 3, generator=torch.Generator().manual_seed(1)) * 4 - 2
    for mode in ("bilinear", "nearest"):
        assert torch.equal(warp_mod.warp_unchecked(moving, disp, mode=mode), warp(moving, disp, mode=mode))
    disp[0, 0, 1, 1, 1] = float("nan")
    assert warp_mod.warp_unchecked(moving, disp).shape == (1, 2, 5, 4, 3)  # no pass over the field: no error either
    with pytest.raises(ValueError, match="moving .* and disp_vox .* grids differ"):  # shapes are still checked
        warp_mod.warp_unchecked(moving[:, :, :4], disp)


def test_the_inner_loops_take_a_nan_field_without_stopping():
    nan_field = torch.zeros(1, 3, 4, 4, 4)
    nan_field[0, 2, 1, 1, 1] = float("nan")
    zero = torch.zeros(1, 3, 4, 4, 4)
    a, b = inverse_consistency(nan_field, zero, 2)
    assert a.isnan().any() and b.isnan().any()
    assert compose(nan_field, zero).isnan().any()
    assert warped_mse_torch(_ramp(), _ramp(), nan_field).shape == ()  # an Adam step's data term
    # finite fields: a constant shift and its negation are exact inverses, left unchanged
    shift = _half_voxel_shift() * 0
    shift[:, 1] = 1.0
    a, b = inverse_consistency(shift, -shift, 3)
    assert torch.equal(a, shift) and torch.equal(b, -shift)


def _stored(name: str, value) -> dict:
    """The stored (JSON) form of a pipeline config with the one setting ``name`` (``"convex.x"`` or ``"x"``)."""
    part, _, key = name.rpartition(".")
    return json.loads(json.dumps({part: {key: value}} if part else {key: value}))


@pytest.mark.parametrize("name, bad", [("use_ic", "no"), ("use_adam", 0), ("convex.normalize_features", "false"),
                                       ("adam.normalize_features", None)])
def test_a_stored_dense_config_whose_switch_is_no_bool_is_refused_by_name(name, bad):
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}: expected true or false, got {re.escape(repr(bad))}$"):
        config_from_dict(_stored(name, bad))
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}: expected true or false, got "):
        DenseCycleConfig.from_dict({"pipeline": _stored(name, bad)})
    part, _, key = name.rpartition(".")
    for value in (True, False):  # true and false themselves are taken as they are
        cfg = config_from_dict(_stored(name, value))
        assert getattr(getattr(cfg, part) if part else cfg, key) is value


def test_the_carried_dense_run_config_still_loads():
    config = json.loads((Path(__file__).resolve().parents[1] / "carried-runs" / "abd4" / "run.json").read_text())
    cfg = DenseCycleConfig.from_dict(config["config"])
    assert (cfg.pipeline.use_ic, cfg.pipeline.use_adam) == (True, True)
    assert cfg.pipeline.convex.normalize_features is True and cfg.pipeline.adam.normalize_features is True
