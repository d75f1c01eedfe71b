"""Contracts of the mends of the third audit's findings (2026-12-07).

Mended: :func:`cyclereg.checkpoint.staged_outputs` removed a stale earlier output that a linked output of the new
set had just been written into (``out/c.csv -> b.csv``, ``b.csv`` an earlier output the set does not write by
name): the new content was deleted and the link left dangling, without an error. A stale file is kept now where a
file of the set was written into it.

Mended: two outputs of one command that lead to one file (``out/c.csv`` a symbolic link to ``out/b.csv``, both
written) gave the second's content to both and lost the first's; :func:`cyclereg.checkpoint.refuse_replacing_inputs`
(``register`` calls it before its work, the set writers again at the move-in) refuses them now, naming the link.

Mended: after a set that moved in, the folders made for a dangling link's target that the body never wrote into
were left behind, empty; they are removed as after a failed set.

Mended: :func:`cyclereg.dense.convex.resample_disp` of an ``out_shape`` without voxels was refused as "shape: ..."
(the argument of :func:`cyclereg.frames.voxel_coordinates`, which it calls); it names ``out_shape`` now.

Mended (found by tests/test_autograd_walk.py's walk): :func:`cyclereg.dense.instance.diffusion_regularizer` of a
field with an axis of one voxel was NaN (the mean of no differences); that axis adds 0 now.
"""

from __future__ import annotations


import pytest
import torch
from typer.testing import CliRunner

import cyclereg.clouds.api as cloud_api
from cyclereg.dense.convex import resample_disp
from cyclereg.checkpoint import atomic_write_text, refuse_replacing_inputs, staged_outputs
from cyclereg.errors import InputError
from cyclereg_cli.main import app


def test_a_stale_output_that_a_linked_output_was_written_into_stays(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.csv").write_text("old b")
    (out / "c.csv").symlink_to("b.csv")
    (out / "d.csv").write_text("old d")
    with staged_outputs(out) as stage:
        stage.stale = [out / "b.csv", out / "d.csv"]
        atomic_write_text(stage / "c.csv", "new c")
    assert (out / "c.csv").is_symlink() and (out / "b.csv").read_text() == "new c"
    assert not (out / "d.csv").exists()  # a stale file nothing was written into still goes


def test_two_outputs_leading_to_one_file_are_refused_naming_the_link(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "c.csv").symlink_to("b.csv")  # dangling: b.csv is made by the same set
    with pytest.raises(InputError, match=r"c\.csv: a symbolic link to b\.csv, another output of this command"):
        refuse_replacing_inputs(["b.csv", "c.csv"], out, [])
    refuse_replacing_inputs(["c.csv"], out, [])  # alone it is a link to follow
    with pytest.raises(InputError, match="both would be written into one file"):
        with staged_outputs(out) as stage:
            atomic_write_text(stage / "b.csv", "new b")
            atomic_write_text(stage / "c.csv", "new c")
    assert sorted(p.name for p in out.iterdir()) == ["c.csv"] and (out / "c.csv").is_symlink()


def test_register_refuses_a_link_between_two_of_its_outputs_before_its_work(pair_files, monkeypatch):
    d, _ = pair_files
    out = d / "out"
    out.mkdir()
    (out / "config.json").symlink_to("displacements.csv")

    def no_work(*args, **kwargs):
        raise AssertionError("the registration ran before the outputs were checked")

    monkeypatch.setattr(cloud_api, "register_clouds", no_work)
    monkeypatch.setattr(cloud_api, "load_cloud_model", no_work)
    res = CliRunner().invoke(app, ["register", str(d / "f.csv"), str(d / "m.csv"), "-o", str(out), "--device", "cpu"])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "config.json: a symbolic link to displacements.csv, another output of this command" in text
    assert "Traceback" not in text and sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_folders_made_for_an_unwritten_dangling_links_target_go_after_a_set_that_moved_in(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "c.csv").symlink_to(tmp_path / "new" / "deep" / "c.csv")
    with staged_outputs(out) as stage:
        stage / "c.csv"  # its path asked for (its staging folder made), never written
        atomic_write_text(stage / "a.csv", "a")
    assert (out / "a.csv").read_text() == "a" and (out / "c.csv").is_symlink()
    assert not (tmp_path / "new").exists()


def test_a_written_dangling_links_folders_stay(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "c.csv").symlink_to(tmp_path / "new" / "deep" / "c.csv")
    with staged_outputs(out) as stage:
        atomic_write_text(stage / "c.csv", "c")
    assert (tmp_path / "new" / "deep" / "c.csv").read_text() == "c"
    assert [p.name for p in (tmp_path / "new" / "deep").iterdir()] == ["c.csv"]  # no staging folder left


@pytest.mark.parametrize("out_shape", [(0, 4, 4), (4, 4), (4, 4, 2.5)])
def test_resample_disp_names_out_shape(out_shape):
    with pytest.raises(ValueError, match=r"^out_shape: expected 3 spatial sizes"):
        resample_disp(torch.zeros(1, 3, 4, 4, 4), out_shape, 2.0)


def test_diffusion_regularizer_of_a_field_with_an_axis_of_one_voxel():
    """Found by the gradient walk: an axis of one voxel has no forward difference; its mean was NaN. It adds 0:
    one unit step along H of a (1, 4, 4) field gives 2 of 36 squared differences along H and 1 of 36 along W."""
    from cyclereg.dense.instance import diffusion_regularizer

    disp = torch.zeros(1, 3, 1, 4, 4, dtype=torch.float64)
    disp[0, 0, 0, 1, 0] = 1.0
    assert diffusion_regularizer(disp).item() == pytest.approx(3 / 36, abs=1e-15)
    single = diffusion_regularizer(torch.zeros(1, 3, 1, 1, 1, dtype=torch.float64))
    assert isinstance(single, torch.Tensor) and single.dtype == torch.float64 and single.item() == 0.0
