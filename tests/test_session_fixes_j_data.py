"""Contracts of small mends of point-file writing, volume preprocessing, volume datasets and two scripts (2026-12-07).

Mended: :func:`cyclereg.pointio.write_points` of an empty ``(0, 3)`` cloud wrote a file (a CSV header alone, an
empty l2r file, an ``.npy`` of shape ``(0, 3)``) that :func:`~cyclereg.pointio.read_points` then refused as empty
(every reader refuses an empty cloud, as the module says); it is now refused up front with one line naming the
file, and nothing is written, in every format.

:func:`cyclereg.dense.data.preprocess` returned float32 for a float64 (or float16 / bfloat16) image, against the
package rule that dtypes follow the inputs; a floating image now keeps its dtype (an integer image still gives
float32, and a float32 image the same bits as before).

:func:`cyclereg.dense.data.resolve_mode` did not read a modality hint with punctuation attached to the word
("Lung CT,", "(CT)", "abdomen_CT") as CT and fell back to the intensity range; the hint's words are now split at
anything not a letter or digit. The rule is otherwise the same: CT as a word or as the start of the first word
("CTA"), so "FBCT" and "CBCT" are still no CT.

Volume datasets gave pair ids that differ only in letter case (scans ``a/Ab.nii.gz`` and ``b/ab.nii.gz``: ids from the
file names) without a word, while keypoint datasets refuse them (:func:`cyclereg.datasets.require_case_distinct_ids`):
training writes a file per pair named by its id, one file for both on a case-insensitive file system. The
``registration_val`` pairs (:func:`~cyclereg.dense.data.load_volume_dataset`) and the pairs training may make of the
``training`` images (every two, either direction: :func:`~cyclereg.dense.data.training_images`) or of
``training_paired_images`` (either direction: :func:`~cyclereg.dense.data.training_pairs`) are now refused the same
way, one line naming the dataset file and the two ids.

``python scripts/set_cloud_test_time.py ""`` read the empty path as the current folder (``Path("")``) and rewrote the
``fold*.pt`` there; an empty (or blank) path, also of ``--training-box-of``, is now refused in one line naming the
argument (:func:`cyclereg.errors.refuse_empty_paths`), exit 1, nothing rewritten.

``python scripts/ensemble_stage.py ENSEMBLE OUT --folds 9`` printed argparse's usage text and then the error (exit 2),
while the script's refusals of a missing ensemble, a learner without configuration or a member without training
are one line ``error: ...`` (exit 1), as every other script's; every refusal after the parse (``--folds``,
``--members``, ``--joint``, ``--jobs``, ``--learn-recentre-passes``, ``--dataset`` / ``--learner``) is now that one
line. Argparse's own refusals (an unknown option, a number that is none) keep its usage text.

Each test checks exact analytic figures or the exact message fragment naming the file or the argument.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from cyclereg.dense.config import PreprocessConfig
from cyclereg.dense.data import load_volume_dataset, preprocess, resolve_mode, training_images, training_pairs
from cyclereg.errors import InputError
from cyclereg.pointio import read_points, write_points

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- write_points of an empty cloud
@pytest.mark.parametrize("name, fmt", [("e.csv", None), ("e.txt", None), ("e.npy", None), ("e.ply", None),
                                       ("e.pcd", None), ("e.csv", "l2r")])
def test_write_points_refuses_an_empty_cloud_naming_the_file_and_writes_nothing(tmp_path, name, fmt):
    out = tmp_path / name
    with pytest.raises(InputError, match="point cloud is empty: nothing to write") as err:
        write_points(out, torch.zeros(0, 3), fmt=fmt, spacing_mm=(1.0, 1.0, 1.0))
    assert str(out) in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_write_points_of_one_point_still_reads_back(tmp_path):
    out = tmp_path / "one.csv"
    write_points(out, torch.tensor([[1.5, -2.0, 3.25]]))
    assert torch.equal(read_points(out), torch.tensor([[1.5, -2.0, 3.25]]))


# ----------------------------------------------------------------------------- preprocess keeps a floating dtype
def test_preprocess_keeps_float64_in_every_mode():
    """CT: x / 500 clipped to [-0.4, 0.6], in float64 (1/3 is no float32 number); MRI: 0..100 has its 1st / 99th
    percentiles at 1 and 99, so x -> (x - 1) / 98 clipped; none: the image itself."""
    cfg = PreprocessConfig()
    ct = torch.tensor([-1000.0, 500.0 / 3, 250.0, 400.0], dtype=torch.float64)
    out = preprocess(ct, cfg, "ct")
    assert out.dtype == torch.float64
    assert torch.equal(out, torch.tensor([-0.4, 1.0 / 3, 0.5, 0.6], dtype=torch.float64).clamp(-0.4, 0.6))
    assert out[1].item() == 1.0 / 3
    x = torch.arange(101, dtype=torch.float64)
    mri = preprocess(x, cfg, "mri")
    assert mri.dtype == torch.float64
    torch.testing.assert_close(mri, ((x - 1) / 98).clamp(0, 1), rtol=0, atol=1e-15)
    assert preprocess(x, cfg, "none").dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_preprocess_keeps_a_low_precision_dtype_also_for_mri(dtype):
    """torch.quantile takes no half type: the percentiles are taken in float32, the result stays in ``dtype``."""
    x = torch.arange(101, dtype=dtype)
    for mode in ("ct", "mri", "none"):
        assert preprocess(x, PreprocessConfig(), mode).dtype == dtype
    assert preprocess(x, PreprocessConfig(), "mri")[[0, 1, 99, 100]].tolist() == [0.0, 0.0, 1.0, 1.0]


def test_preprocess_of_float32_and_integer_images_is_float32_as_before():
    cfg = PreprocessConfig()
    x = torch.tensor([-1000.0, 500.0 / 3, 250.0, 400.0])
    assert torch.equal(preprocess(x, cfg, "ct"), (x / 500.0).clamp(-0.4, 0.6))
    ints = torch.arange(101, dtype=torch.int16)
    for mode in ("ct", "mri", "none"):
        assert preprocess(ints, cfg, mode).dtype == torch.float32
    assert torch.equal(preprocess(ints, cfg, "mri"), preprocess(torch.arange(101.0), cfg, "mri"))


# ----------------------------------------------------------------------------- resolve_mode: punctuation
MRI_LIKE, CT_LIKE = torch.tensor([0.0, 800.0]), torch.tensor([-1000.0, 50.0])


@pytest.mark.parametrize("hint", ["Lung CT,", "(CT)", "CT.", "abdomen_CT", "Thorax-CT", "(CTA)", "CT/MR"])
def test_a_ct_hint_with_attached_punctuation_is_ct(hint):
    assert resolve_mode(MRI_LIKE, PreprocessConfig(), hint) == "ct"


@pytest.mark.parametrize("hint", ["FBCT", "CBCT", "Lung FBCT,", "(CBCT)", "fbct cbct", "Abdomen CTA", "PET"])
def test_words_that_only_contain_ct_are_still_no_ct(hint):
    """Not CT: the intensities decide (an MRI-like range: MRI; a CT-like range: CT)."""
    assert resolve_mode(MRI_LIKE, PreprocessConfig(), hint) == "mri"
    assert resolve_mode(CT_LIKE, PreprocessConfig(), hint) == "ct"


@pytest.mark.parametrize("hint", ["MRI", "T1w", "T2,", "(MR)"])
def test_mri_hints_are_still_mri(hint):
    assert resolve_mode(CT_LIKE, PreprocessConfig(), hint) == "mri"


# ----------------------------------------------------------------------------- volume ids differing in case
def _volume_dataset(tmp_path, scans, val, paired=None):
    """A Learn2Reg dataset JSON over empty files ``scans`` (the readers here only resolve the paths)."""
    for name in scans:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    obj = {"training": [{"image": s} for s in scans],
           "registration_val": [{"fixed": f, "moving": m} for f, m in val]}
    if paired is not None:
        obj["training_paired_images"] = [{"fixed": f, "moving": m} for f, m in paired]
    path = tmp_path / "t_dataset.json"
    path.write_text(json.dumps(obj))
    return path


def _case_clash(err, path, a, b):
    text = str(err.value)
    assert text.startswith(f"{path}: pair ids {a!r} and {b!r} differ only in letter case") and "\n" not in text


def test_registration_val_pairs_differing_only_in_case_are_refused(tmp_path):
    ds = _volume_dataset(tmp_path, ["a/Ab.nii.gz", "b/ab.nii.gz", "c/X.nii.gz"],
                         [("a/Ab.nii.gz", "c/X.nii.gz"), ("b/ab.nii.gz", "c/X.nii.gz")])
    with pytest.raises(InputError) as err:
        load_volume_dataset(ds)
    _case_clash(err, ds, "Ab_X", "ab_X")


def test_training_images_differing_only_in_case_are_refused(tmp_path):
    """Two images 'Ab' and 'ab' make the pairs Ab_ab and ab_Ab (directions both): one file on macOS."""
    ds = _volume_dataset(tmp_path, ["a/Ab.nii.gz", "b/ab.nii.gz", "c/X.nii.gz", "d/Y.nii.gz"],
                         [("c/X.nii.gz", "d/Y.nii.gz")])
    with pytest.raises(InputError) as err:
        training_images(ds)
    _case_clash(err, ds, "Ab_ab", "ab_Ab")


def test_training_paired_images_differing_only_in_case_are_refused(tmp_path):
    ds = _volume_dataset(tmp_path, ["a/Ab.nii.gz", "b/ab.nii.gz", "c/X.nii.gz", "d/Y.nii.gz", "e/Z.nii.gz"],
                         [("d/Y.nii.gz", "e/Z.nii.gz")], paired=[("a/Ab.nii.gz", "c/X.nii.gz"), ("b/ab.nii.gz", "c/X.nii.gz")])
    with pytest.raises(InputError) as err:
        training_pairs(ds)
    _case_clash(err, ds, "Ab_X", "ab_X")


def test_volume_ids_distinct_beyond_case_still_load(tmp_path):
    ds = _volume_dataset(tmp_path, ["a/Ab.nii.gz", "b/Cd.nii.gz", "c/X.nii.gz"],
                         [("a/Ab.nii.gz", "c/X.nii.gz"), ("b/Cd.nii.gz", "c/X.nii.gz")],
                         paired=[("a/Ab.nii.gz", "b/Cd.nii.gz")])
    assert [q.id for q in load_volume_dataset(ds).pairs] == ["Ab_X", "Cd_X"]
    assert [q.name for q in training_images(ds, held_out=False)] == ["Ab.nii.gz", "Cd.nii.gz", "X.nii.gz"]
    assert [(f.name, m.name) for f, m in training_pairs(ds, held_out=False)] == [("Ab.nii.gz", "Cd.nii.gz")]


# ----------------------------------------------------------------------------- set_cloud_test_time.py ""
@pytest.mark.parametrize("argv, name", [([""], "paths"), (["  "], "paths"),
                                        (["fold1.pt", "--training-box-of", ""], "--training-box-of")])
def test_set_cloud_test_time_refuses_an_empty_path_rewriting_nothing(tmp_path, monkeypatch, capsys, argv, name):
    ckpt = tmp_path / "fold1.pt"
    ckpt.write_bytes((ROOT / "models" / "copd" / "fold1.pt").read_bytes())
    before = ckpt.read_bytes()
    monkeypatch.chdir(tmp_path)  # the folder an empty path would stand for
    monkeypatch.setattr(sys, "argv", ["set_cloud_test_time.py", *argv, "--tta-passes", "0"])
    with pytest.raises(SystemExit) as stop:
        load_script("scripts/set_cloud_test_time.py").main()
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.strip().splitlines() == [f"error: {name}: an empty path (an unset shell "
                                                                 "variable?); give '.' to mean the current folder"]
    assert ckpt.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["fold1.pt"]


# ----------------------------------------------------------------------------- ensemble_stage.py: one line
@pytest.mark.parametrize("args, line", [
    (["--folds", "9"], "error: --folds 9: the ensemble has folds 1,2"),
    (["--folds", "x"], "error: --folds x: expected fold numbers such as 1,3"),
    (["--members", "2"], "error: --members 2: the ensemble has members 0..1"),
    (["--members", "x"], "error: --members x: expected member indices such as 0,2"),
    (["--joint", "2"], "error: --joint 2: the ensemble has members 0..1"),
    (["--joint", "0", "--members", "0"], "error: --joint trains all members of the ensemble: not with --learner or "
                                         "--members"),
    (["--jobs", "0"], "error: --jobs 0: need 1 or more"),
    (["--learn-recentre-passes", "-1"], "error: --learn-recentre-passes -1: need 0 or more"),
])
def test_ensemble_stage_refuses_a_bad_option_in_one_line_without_usage(tmp_path, monkeypatch, capsys, args, line):
    ens = tmp_path / "ens"
    ens.mkdir()
    (ens / "ensemble.json").write_text(json.dumps({"members": {"fold1": ["a", "b"], "fold2": ["a", "b"]}}))
    (tmp_path / "dataset.json").write_text("{}")
    mod = load_script("scripts/ensemble_stage.py")
    monkeypatch.setattr(mod, "run_parallel", lambda *a, **k: pytest.fail("no job may start"))
    monkeypatch.setattr(sys, "argv", ["ensemble_stage.py", str(ens), str(tmp_path / "out"),
                                      "--dataset", str(tmp_path / "dataset.json"), *args])
    with pytest.raises(SystemExit) as stop:
        mod.main()
    assert stop.value.code == 1 and capsys.readouterr().err.splitlines() == [line]
    assert not (tmp_path / "out").exists()


def test_ensemble_stage_names_a_missing_dataset_in_one_line(tmp_path, monkeypatch, capsys):
    mod = load_script("scripts/ensemble_stage.py")
    missing = tmp_path / "nope.json"
    monkeypatch.setattr(sys, "argv", ["ensemble_stage.py", str(tmp_path), str(tmp_path / "out"), "--dataset",
                                      str(missing)])
    with pytest.raises(SystemExit) as stop:
        mod.main()
    assert stop.value.code == 1 and capsys.readouterr().err.splitlines() == [f"error: --dataset {missing}: no such file"]
