"""Damaged or inconsistent model checkpoints are refused when loaded, with one line naming the file:
non-finite weights, a configuration that is not a mapping, and settings no registration can use."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cyclereg.checkpoint import load_checkpoint, save_checkpoint
from cyclereg.clouds.api import load_cloud_model
from cyclereg.clouds.features import build_graph_net
from cyclereg.clouds.pipeline import CloudRegConfig
from cyclereg.clouds.tps import TPSConfig
from cyclereg.dense.api import load_model, save_model
from cyclereg.dense.config import DensePipelineConfig, config_from_dict
from cyclereg.dense.network import random_feature_net
from cyclereg.errors import InputError


def _cloud_checkpoint(path, *, config=None, damage=None):
    """A random cloud network's checkpoint at ``path``; ``config``: the stored configuration (default:
    the defaults as a dict); ``damage``: a function applied to its state dict before saving."""
    cfg = CloudRegConfig()
    state = build_graph_net(cfg.net, seed=0).state_dict()
    if damage is not None:
        damage(state)
    save_checkpoint(path, kind="cloud", config=cfg if config is None else config, state_dict=state)
    return path


def _dense_checkpoint(path, *, cfg=DensePipelineConfig(), damage=None):
    net = random_feature_net(cfg.net, seed=0)
    if damage is not None:
        damage(net)
    save_model(path, net, cfg)
    return path


def test_intact_checkpoints_load(tmp_path):
    load_cloud_model(_cloud_checkpoint(tmp_path / "c.pt"))
    load_model(_dense_checkpoint(tmp_path / "d.pt"))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_file_and_tensor(tmp_path, value):
    """A diverged network registers every point to NaN: refused at load (both paths, and for every
    reader of checkpoints: ensembles and the trainer's resume read through ``load_checkpoint``)."""
    def cloud_damage(state):
        name = next(k for k, v in state.items() if v.is_floating_point())
        state[name].view(-1)[0] = value

    cloud = _cloud_checkpoint(tmp_path / "c.pt", damage=cloud_damage)
    with pytest.raises(InputError, match=r"c\.pt: the network's weights hold NaN or inf \(") as err:
        load_cloud_model(cloud)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="NaN or inf"):
        load_checkpoint(cloud, kind="cloud")

    def dense_damage(net):
        with torch.no_grad():
            next(net.parameters()).view(-1)[-1] = value

    with pytest.raises(InputError, match=r"d\.pt: the network's weights hold NaN or inf"):
        load_model(_dense_checkpoint(tmp_path / "d.pt", damage=dense_damage))


@pytest.mark.parametrize("config", [[1, 2], "abc", 3])
def test_a_cloud_configuration_that_is_not_a_mapping_is_one_line(tmp_path, config):
    path = _cloud_checkpoint(tmp_path / "c.pt", config=config)
    with pytest.raises(InputError, match=r"c\.pt: checkpoint does not match this version's cloud model"):
        load_cloud_model(path)


@pytest.mark.parametrize("tps,message", [({"kernel": "bogus"}, "kernel: expected 'r2logr' or 'r'"),
                                         ({"grid_step": 0}, "grid_step: expected a whole number"),
                                         ({"regularisation": float("nan")}, "regularisation: expected a finite")])
def test_unusable_tps_settings_are_refused_at_load(tmp_path, tps, message):
    """Before: a bogus kernel failed mid-registration with a traceback; a zero grid step was taken."""
    stored = dataclasses.asdict(CloudRegConfig())
    stored["tps"].update(tps)
    with pytest.raises(InputError, match=message):
        load_cloud_model(_cloud_checkpoint(tmp_path / "c.pt", config=stored))
    with pytest.raises(ValueError, match=message):
        TPSConfig(**tps)


@pytest.mark.parametrize("change,message", [
    ({"adam": {"iterations": -3}}, "adam.iterations: expected a whole number >= 0, got -3"),
    ({"convex": {"radius": 0}}, "convex.radius: expected a whole number >= 1, got 0"),
    ({"spacing_mm": [float("nan")] * 3}, r"spacing_mm\[0\]: expected a finite number > 0, got nan"),
    ({"spacing_mm": [1.0, 1.0]}, "spacing_mm: expected three voxel sizes"),
    ({"adam": {"lr": 0}}, "adam.lr: expected a finite number > 0"),
    ({"convex": {"coupling": [0.1, -1]}}, r"convex.coupling\[1\]: expected a finite number >= 0"),
])
def test_unusable_dense_settings_are_refused_at_load(tmp_path, change, message):
    """Before: ``adam.iterations = -3`` silently skipped Adam; a NaN spacing turned the spacing check off."""
    stored = dataclasses.asdict(DensePipelineConfig())
    for key, value in change.items():
        if isinstance(value, dict):
            stored[key].update(value)
        else:
            stored[key] = value
    with pytest.raises(ValueError, match=message):
        config_from_dict(stored)
    path = tmp_path / "d.pt"
    save_checkpoint(path, kind="dense", config=stored, state_dict=random_feature_net(DensePipelineConfig().net, 0)
                    .state_dict())
    # (the checkpoint's configuration is strict JSON: a NaN is stored as null, and refused as that)
    with pytest.raises(InputError, match=r"d\.pt: checkpoint does not match the dense model \(ValueError: "
                       + message.split(", got")[0]):
        load_model(path)


def test_a_non_finite_registration_is_never_written(pair_files, monkeypatch):
    """Whatever makes a registration NaN (here: a patched optimiser), ``register`` writes nothing and
    exits 1 with one line naming the fixed file; an earlier output folder stays as it was."""
    from typer.testing import CliRunner

    from cyclereg.clouds import api as cloud_api
    from cyclereg_cli.main import app

    folder, _ = pair_files
    real = cloud_api.register_clouds

    def nan_registration(*args, **kwargs):
        reg = real(*args, **kwargs)
        reg.displacements_mm[3] = float("nan")
        return reg

    monkeypatch.setattr(cloud_api, "register_clouds", nan_registration)
    out = folder / "out"
    out.mkdir()
    (out / "displacements.csv").write_text("earlier\n")
    res = CliRunner().invoke(app, ["register", str(folder / "f.csv"), str(folder / "m.csv"), "-o", str(out),
                                   "--device", "cpu"])
    assert res.exit_code == 1, res.output
    assert "f.csv: the displacements hold NaN or inf (3 of" in " ".join(res.output.split())
    assert "nothing written" in res.output and "Traceback" not in res.output
    assert sorted(p.name for p in out.iterdir()) == ["displacements.csv"]
    assert (out / "displacements.csv").read_text() == "earlier\n"


def test_a_checkpoint_of_the_other_kind_is_named_with_what_it_is_for(tmp_path):
    """A keypoint-cloud model where a dense one is expected (and back): one line naming both kinds and what
    the model is for, not a state-dict error."""
    cloud = _cloud_checkpoint(tmp_path / "c.pt")
    dense = _dense_checkpoint(tmp_path / "d.pt")
    with pytest.raises(InputError, match=r"'cloud' model, expected 'dense' \(a keypoint-cloud model: .*--via-keypoints"):
        load_checkpoint(cloud, kind="dense")
    with pytest.raises(InputError, match=r"'dense' model, expected 'cloud' \(a dense volume model"):
        load_checkpoint(dense, kind="cloud")
    with pytest.raises(InputError, match="expected 'cloud'"):
        load_cloud_model(dense)
    with pytest.raises(InputError, match="expected 'dense'"):
        load_model(cloud)
    assert load_checkpoint(cloud, kind="cloud")["kind"] == "cloud"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomically_written_files_get_the_umasks_mode(tmp_path, umask, mode):
    """The temporary file is private (0600); the file it becomes gets what open() would have given it."""
    import os
    import stat

    from cyclereg.checkpoint import atomic_write_bytes, atomic_write_text

    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", lambda fh: fh.write(b"x"))
        atomic_write_text(tmp_path / "a.txt", "x")
        save_checkpoint(tmp_path / "c.pt", kind="cloud", config={}, state_dict={})
    finally:
        os.umask(old)
    for name in ("a.bin", "a.txt", "c.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_nan_and_inf_inside_tensors_and_numpy_values_become_json_null():
    """Strict JSON for records holding tensors or numpy values: their NaN / inf elements are ``null`` as a
    plain float's are (a tensor's ``tolist()`` was returned as it was, so ``json_text`` refused a NaN loss),
    and numpy float32 scalars and arrays become Python numbers (``json`` cannot write them)."""
    import json

    import numpy as np

    from cyclereg.checkpoint import json_text, to_jsonable

    assert to_jsonable(torch.tensor([1.0, float("nan")])) == [1.0, None]
    assert to_jsonable(torch.tensor([[float("-inf"), 2.5]])) == [[None, 2.5]]
    assert to_jsonable(np.array([0.5, np.inf], dtype=np.float32)) == [0.5, None]
    assert to_jsonable({"n": np.int64(3), "x": np.float32(0.25), "ok": np.bool_(True)}) == {"n": 3, "x": 0.25,
                                                                                           "ok": True}
    assert json.loads(json_text({"loss": torch.tensor(float("inf")), "d": np.float32("nan")})) == {"loss": None,
                                                                                                  "d": None}
