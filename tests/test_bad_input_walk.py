"""Bad-input walk over every command and the scripts that take files (audited 2026-12-07).

The project's rule: bad input (a missing file, a wrong shape, NaN/inf, an empty cloud, a point file with a
wrong column count or text in it, an unreadable or truncated NIfTI, a dataset.json with missing keys, wrong
types or pairs naming missing files, an output path whose parent is a file) gives ONE line naming the file and
the problem, a non-zero exit code, no Python traceback, and leaves no new or changed output behind.

Each command was fed such input through typer's CliRunner (``keypoints``, ``pretrain-random``, ``cycle``,
``status``, ``register``, ``evaluate``, ``compare``, ``ensemble``, ``demo``), and the scripts of ``scripts/``
and ``examples/`` that take files were called through their ``main``. The cases the code already handles and
no other test covered are pinned below as compact parametrised tests. The walk found fifteen cases handled
badly (tracebacks, a wrong message, training on validation scans, partial output); each was mended in the
library or the script, and its test here fails without the mend.
"""

from __future__ import annotations

import gzip
import json
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cyclereg.errors import InputError
from cyclereg_cli.main import app

from conftest import REPO, load_script

runner = CliRunner()


def _listing(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (``None`` for a folder): what a failed command must leave."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _one_line_error(res, *named: str, code: int = 2) -> str:
    """The single stderr/stdout line of a refused command: exit ``code``, no traceback, names each of ``named``."""
    assert res.exit_code == code, (res.exit_code, res.output)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    text = res.output.strip()
    assert "\n" not in text and "Traceback" not in text, text
    for name in named:
        assert name in text, (name, text)
    return text


# ----------------------------------------------------------------------------- tiny inputs
def _blob(shape=(24, 28, 32), seed=0) -> np.ndarray:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    img = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    return ((img - img.min()) / (img.max() - img.min()) * 1000.0).astype(np.float32)


AFFINE = np.diag([2.0, 1.5, 1.0, 1.0])


def _save(path: Path, arr, affine=AFFINE) -> Path:
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


@pytest.fixture(scope="module")
def learn2reg(tmp_path_factory):
    """A Learn2Reg-layout folder: four tiny scans with label maps, and the dataset JSON as a dict (not written)."""
    d = tmp_path_factory.mktemp("l2r")
    (d / "imagesTr").mkdir()
    (d / "labelsTr").mkdir()
    names = []
    for n in range(1, 5):
        name = f"Tiny_{n:04d}_0000.nii.gz"
        img = _blob(seed=n)
        _save(d / "imagesTr" / name, img)
        _save(d / "labelsTr" / name, (img > 500).astype(np.int16))
        names.append(name)
    obj = {"name": "tiny", "modality": {"0": "MRI"},
           "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in names],
           "registration_val": [{"fixed": f"./imagesTr/{names[0]}", "moving": f"./imagesTr/{names[1]}"}]}
    return d, obj


def _keypoint_dataset(folder: Path, pair_files_dir: Path, **changes) -> Path:
    """A two-pair keypoint dataset over the ``pair_files`` clouds (both pairs the same files), with ``changes``
    applied to the second pair's entry."""
    pairs = [{"id": f"p{i}", "fixed_keypoints": str(pair_files_dir / "f.csv"),
              "moving_keypoints": str(pair_files_dir / "m.csv"), "fixed_landmarks": str(pair_files_dir / "l.csv"),
              "moving_landmarks": str(pair_files_dir / "ml.csv")} for i in range(2)]
    pairs[1].update(changes)
    path = folder / "dataset.json"
    path.write_text(json.dumps({"name": "walk", "pairs": pairs}))
    return path


# ----------------------------------------------------------------------------- point files (handled)
def _bad_point_file(d: Path, case: str) -> Path:
    """Write the bad point file ``case`` in ``d`` and return its path."""
    fixed = np.loadtxt(d / "f.csv", delimiter=",", skiprows=1)
    body = "\n".join(",".join(f"{v:.3f}" for v in row) for row in fixed)
    if case == "pickled_object.npy":
        np.save(d / case, np.array([[1, 2, 3]] * 20, dtype=object), allow_pickle=True)
    elif case == "structured.npy":
        np.save(d / case, np.zeros(20, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")]))
    elif case == "column.npy":
        np.save(d / case, fixed[:, :, None])
    elif case == "transposed.npy":
        np.save(d / case, fixed.T.copy())
    elif case == "scalar.npy":
        np.save(d / case, np.float64(3.0))
    elif case == "no_rows.npy":
        np.save(d / case, np.zeros((0, 3)))
    elif case == "truncated.npy":
        np.save(d / "whole.npy", fixed)
        data = (d / "whole.npy").read_bytes()
        (d / case).write_bytes(data[: len(data) // 2])
    elif case == "semicolons.csv":
        (d / case).write_text("x_mm;y_mm;z_mm\n" + body.replace(",", ";"))
    elif case == "tabs.csv":
        (d / case).write_text("x_mm,y_mm,z_mm\n" + body.replace(",", "\t"))
    elif case == "quoted_header.csv":
        (d / case).write_text('"x_mm","y_mm","z_mm"\n' + body)
    elif case == "duplicate_header.csv":
        (d / case).write_text("x_mm,x_mm,z_mm\n" + body)
    elif case == "not_utf8.csv":
        (d / case).write_bytes(b"\xff\xfe\x00\x01" * 10)
    elif case == "headerless_4_columns.csv":
        (d / case).write_text("\n".join(line + ",0" for line in body.splitlines()))
    elif case == "folder.csv":
        (d / case).mkdir()
    elif case == "points.json":
        (d / case).write_text("{}")
    else:
        raise ValueError(case)
    return d / case


@pytest.mark.parametrize("case, problem", [
    ("pickled_object.npy", "not a readable .npy array"),
    ("structured.npy", "expected real numbers"),
    ("column.npy", "expected 3 columns per point, got array of shape"),
    ("transposed.npy", "expected 3 columns per point, got array of shape (3, "),
    ("scalar.npy", "got array of shape ()"),
    ("no_rows.npy", "point cloud is empty"),
    ("truncated.npy", "not a readable .npy array"),
    ("semicolons.csv", "line 2: not a number"),  # the header is one cell "x_mm;y_mm;z_mm"
    ("tabs.csv", "line 2: not a number"),
    ("quoted_header.csv", "expected the columns x_mm,y_mm,z_mm"),
    ("duplicate_header.csv", "expected the columns x_mm,y_mm,z_mm"),
    ("not_utf8.csv", "cannot read text"),
    ("headerless_4_columns.csv", "expected 3 columns per point, got 4"),
    ("folder.csv", "is not a regular file"),
    ("points.json", "unknown point-cloud format '.json'"),
])
def test_register_refuses_a_bad_point_file_by_name_and_writes_nothing(pair_files, case, problem):
    d, _ = pair_files
    bad = _bad_point_file(d, case)
    before = _listing(d)
    for fixed, moving in ((bad, d / "m.csv"), (d / "f.csv", bad)):
        res = runner.invoke(app, ["register", str(fixed), str(moving), "-o", str(d / "out"), "--device", "cpu"])
        _one_line_error(res, str(bad), problem)
        assert _listing(d) == before


# ----------------------------------------------------------------------------- outputs under a file (handled)
def test_an_output_below_a_file_is_refused_by_every_command_before_any_work(pair_files):
    """``-o``/``--json``/``--save-mask`` naming a path inside a plain file: one line naming that path and the
    file, exit 2, nothing new anywhere (register, evaluate and demo are pinned by test_cli_clouds)."""
    d, _ = pair_files
    (d / "afile").write_text("x")
    ct = _save(d / "ct.nii.gz", _blob())
    ds = _keypoint_dataset(d, d)
    report = d / "r.json"
    report.write_text(json.dumps({"dataset": "x", "cases": [{"id": "a", "tre_after_mm": {"mean": 1.0}}]}))
    other = d / "r2.json"
    other.write_text(json.dumps({"dataset": "x", "cases": [{"id": "a", "tre_after_mm": {"mean": 2.0}}]}))
    below = d / "afile"
    before = _listing(d)
    for args, target in (
            (["keypoints", str(ct), "-o", str(below / "k.csv")], below / "k.csv"),
            (["keypoints", str(ct), "-o", str(d / "k.csv"), "--lung-mask", "--save-mask", str(below / "m.nii.gz")],
             below / "m.nii.gz"),
            (["pretrain-random", str(ds), "-o", str(below / "run"), "--device", "cpu"], below / "run"),
            (["compare", str(report), str(other), "--json", str(below / "c.json")], below / "c.json"),
            (["ensemble", str(REPO / "models/copd/fold1.pt"), str(REPO / "models/copd/fold2.pt"), "-o",
              str(below / "e")], below / "e")):
        res = runner.invoke(app, args)
        _one_line_error(res, str(target), f"{below} is a file")
        assert _listing(d) == before, args[0]


# ----------------------------------------------------------------------------- damaged NIfTI (handled)
@pytest.mark.parametrize("case, problem", [
    ("cut.nii.gz", "unreadable NIfTI (EOFError"),  # the gzip stream ends early
    ("cut.nii", "unreadable NIfTI (OSError: Expected"),  # the voxel data ends early
    ("plain.nii.gz", "is not a gzip file"),  # an uncompressed NIfTI named .nii.gz
])
def test_a_truncated_or_misnamed_nifti_is_one_line_for_keypoints_and_register(tmp_path, case, problem):
    good = _save(tmp_path / "good.nii.gz", _blob())
    raw = good.read_bytes()
    plain = gzip.decompress(raw)
    data = {"cut.nii.gz": raw[: len(raw) // 2], "cut.nii": plain[: len(plain) // 2], "plain.nii.gz": plain}[case]
    (tmp_path / case).write_bytes(data)
    before = _listing(tmp_path)
    for args in (["keypoints", str(tmp_path / case), "-o", str(tmp_path / "k.csv")],
                 ["register", str(good), str(tmp_path / case), "-o", str(tmp_path / "out"), "--device", "cpu"],
                 ["register", str(tmp_path / case), str(good), "-o", str(tmp_path / "out"), "--device", "cpu"]):
        res = runner.invoke(app, args)
        _one_line_error(res, str(tmp_path / case), problem)
        assert _listing(tmp_path) == before


# ----------------------------------------------------------------------------- bugs: point files
def test_an_npz_archive_named_npy_is_one_line_naming_the_file(pair_files):
    d, pair = pair_files
    np.savez(d / "archive.npz", points=pair.fixed_mm.numpy())
    (d / "archive.npy").write_bytes((d / "archive.npz").read_bytes())
    before = _listing(d)
    res = runner.invoke(app, ["register", str(d / "archive.npy"), str(d / "m.csv"), "-o", str(d / "out")])
    _one_line_error(res, str(d / "archive.npy"))
    assert _listing(d) == before


# ----------------------------------------------------------------------------- bugs: keypoint dataset.json
@pytest.mark.parametrize("pair_id", [None, ["x"], {"a": 1}])
def test_a_pair_id_that_is_no_name_is_refused_naming_the_dataset(pair_files, pair_id):
    d, _ = pair_files
    ds = _keypoint_dataset(d, d, id=pair_id)
    res = runner.invoke(app, ["evaluate", str(ds), "--identity", "--json", str(d / "rep" / "r.json")])
    _one_line_error(res, str(ds), "pairs[1]")
    assert not (d / "rep").exists()


@pytest.mark.parametrize("pair_id", ["", "   "])
def test_an_empty_pair_id_is_refused_naming_the_dataset(pair_files, pair_id):
    d, _ = pair_files
    ds = _keypoint_dataset(d, d, id=pair_id)
    res = runner.invoke(app, ["evaluate", str(ds), "--identity", "--json", str(d / "rep" / "r.json")])
    _one_line_error(res, str(ds))
    assert not (d / "rep").exists()


@pytest.mark.parametrize("pair_id, name", [(7, "7"), ("copd 1", "copd 1")])
def test_a_whole_number_or_text_pair_id_names_the_pair(pair_files, pair_id, name):
    """A JSON whole number is a pair name too (``7`` is the pair ``"7"``); a text is kept as written."""
    from cyclereg.datasets import load_keypoint_dataset

    d, _ = pair_files
    assert [q.id for q in load_keypoint_dataset(_keypoint_dataset(d, d, id=pair_id)).pairs] == ["p0", name]


# ----------------------------------------------------------------------------- bugs: Learn2Reg dataset.json
@pytest.mark.parametrize("shape", ["dict", "list_of_lists"])
def test_pretrain_random_refuses_a_malformed_registration_val(learn2reg, tmp_path, one_intraop_thread, shape):
    d, obj = learn2reg
    pair = obj["registration_val"][0]
    bad = {**obj, "registration_val": pair if shape == "dict" else [[pair["fixed"], pair["moving"]]]}
    ds = d / f"bad_val_{shape}.json"  # beside the scans: their paths are relative
    ds.write_text(json.dumps(bad))
    try:
        res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / "run"), "--device", "cpu",
                                  "--iterations", "1", "--max-train-pairs", "1"])
    finally:
        ds.unlink()
    _one_line_error(res, str(ds), "registration_val")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", [None, 3])
def test_a_scan_path_of_the_wrong_type_is_named_as_the_datasets_entry(learn2reg, tmp_path, value):
    d, obj = learn2reg
    bad = json.loads(json.dumps(obj))
    bad["registration_val"][0]["fixed"] = value
    ds = d / "bad_fixed.json"
    ds.write_text(json.dumps(bad))
    try:
        res = runner.invoke(app, ["evaluate", str(ds), "--identity", "--json", str(tmp_path / "r.json")])
    finally:
        ds.unlink()
    _one_line_error(res, str(ds), "registration_val")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- bugs: NIfTI beyond float32
@pytest.fixture
def beyond_float32(tmp_path):
    """A float64 NIfTI whose voxels are finite but beyond float32's range (~3.4e38)."""
    return _save(tmp_path / "huge.nii.gz", _blob().astype(np.float64) * 1e300)


def test_a_volume_beyond_float32_warns_nothing(beyond_float32, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = runner.invoke(app, ["keypoints", str(beyond_float32), "-o", str(tmp_path / "k.csv")])
    _one_line_error(res, str(beyond_float32))
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []


def test_a_volume_beyond_float32_is_named_as_out_of_range(beyond_float32, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = runner.invoke(app, ["keypoints", str(beyond_float32), "-o", str(tmp_path / "k.csv")])
    text = _one_line_error(res, str(beyond_float32))
    assert "NaN" not in text and ("float32" in text or "range" in text)


# ----------------------------------------------------------------------------- bugs: scripts and examples
def _script_outcome(call, capsys) -> tuple[object, str]:
    """(exit code, stderr) of a script's ``main`` call; any exception but SystemExit propagates (a traceback)."""
    try:
        code = call()
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip()
    if isinstance(code, str):  # sys.exit("message"): Python prints it on stderr and exits 1
        code, err = 1, (err + "\n" + code).strip()
    return code, err


def _assert_script_refused(code, err: str, *named: str) -> None:
    assert code not in (0, None), code
    assert "\n" not in err and "Traceback" not in err, err
    for name in named:
        assert name in err, (name, err)


@pytest.mark.parametrize("content", [None, b"not a checkpoint"])
def test_set_cloud_test_time_names_a_bad_checkpoint_in_one_line(tmp_path, capsys, monkeypatch, content):
    ckpt = tmp_path / "fold1.pt"
    if content is not None:
        ckpt.write_bytes(content)
    mod = load_script("scripts/set_cloud_test_time.py")
    monkeypatch.setattr(sys, "argv", ["set_cloud_test_time.py", str(ckpt), "--tta-passes", "0"])
    code, err = _script_outcome(mod.main, capsys)
    _assert_script_refused(code, err, str(ckpt))
    assert (ckpt.read_bytes() if ckpt.exists() else None) == content


def test_run_model_set_names_a_run_json_that_is_not_json(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{oops")
    mod = load_script("scripts/run_model_set.py")
    code, err = _script_outcome(lambda: mod.main([str(run), "-o", str(tmp_path / "set")]), capsys)
    _assert_script_refused(code, err, str(run / "run.json"))
    assert not (tmp_path / "set").exists()


def test_run_model_set_refuses_an_output_below_a_file(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "fold1").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"folds": [["a"]], "config": {}}))
    (run / "fold1" / "final.pt").write_bytes(b"x")  # found; read only after the output folder is made
    (tmp_path / "afile").write_text("x")
    before = _listing(tmp_path)
    mod = load_script("scripts/run_model_set.py")
    code, err = _script_outcome(lambda: mod.main([str(run), "-o", str(tmp_path / "afile" / "set")]), capsys)
    _assert_script_refused(code, err, str(tmp_path / "afile"))
    assert _listing(tmp_path) == before


def test_ensemble_stage_names_a_missing_ensemble_in_one_line(tmp_path, capsys, monkeypatch):
    mod = load_script("scripts/ensemble_stage.py")
    monkeypatch.setattr(sys, "argv", ["ensemble_stage.py", str(tmp_path / "nope"), str(tmp_path / "out")])
    code, err = _script_outcome(mod.main, capsys)
    _assert_script_refused(code, err, str(tmp_path / "nope"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("example", ["examples/chest_ct_end_to_end.py", "examples/own_ct_pairs.py"])
@pytest.mark.parametrize("ct", ["missing.nii.gz", "garbage.nii.gz"])
def test_examples_name_a_bad_ct_in_one_line_and_make_no_folder(tmp_path, capsys, example, ct):
    (tmp_path / "garbage.nii.gz").write_bytes(b"not a nifti")
    mod = load_script(example)
    out = tmp_path / "out"
    code, err = _script_outcome(lambda: mod.main(["--ct", str(tmp_path / ct), "--out", str(out)]), capsys)
    _assert_script_refused(code, err, str(tmp_path / ct))
    assert not out.exists()


# ----------------------------------------------------------------------------- bugs: PLY / PCD headers
def _pcd(path: Path, fields: list[str], points: np.ndarray) -> Path:
    """A binary PCD of float32 ``fields`` (each column of ``points`` in turn, repeated as needed)."""
    n = len(fields)
    head = (f"VERSION .7\nFIELDS {' '.join(fields)}\nSIZE {' '.join(['4'] * n)}\nTYPE {' '.join(['F'] * n)}\n"
            f"COUNT {' '.join(['1'] * n)}\nWIDTH {len(points)}\nHEIGHT 1\nPOINTS {len(points)}\nDATA binary\n")
    table = np.stack([points[:, i % 3] for i in range(n)], axis=1).astype("<f4") if n else np.zeros((len(points), 0))
    path.write_bytes(head.encode() + table.tobytes())
    return path


def _ply(path: Path, properties: list[str], points: np.ndarray) -> Path:
    """A binary little-endian PLY whose vertices hold the float ``properties`` (columns of ``points`` in turn)."""
    head = (f"ply\nformat binary_little_endian 1.0\nelement vertex {len(points)}\n"
            + "".join(f"property float {p}\n" for p in properties) + "end_header\n")
    table = np.stack([points[:, i % 3] for i in range(len(properties))], axis=1).astype("<f4")
    path.write_bytes(head.encode() + table.tobytes())
    return path


@pytest.mark.parametrize("make, names", [(_pcd, ["x", "y", "z", "x"]), (_pcd, ["x", "x", "z"]),
                                         (_ply, ["x", "y", "z", "x"]), (_ply, ["x", "y", "y"])],
                         ids=["pcd_xyzx", "pcd_xxz", "ply_xyzx", "ply_xyy"])
def test_a_point_file_naming_a_field_twice_is_one_line(pair_files, make, names):
    d, pair = pair_files
    bad = make(d / f"twice.{'pcd' if make is _pcd else 'ply'}", names, pair.fixed_mm.numpy())
    before = _listing(d)
    res = runner.invoke(app, ["register", str(bad), str(d / "m.csv"), "-o", str(d / "out")])
    _one_line_error(res, str(bad))
    assert _listing(d) == before


def test_a_pcd_without_fields_is_one_line(pair_files):
    d, pair = pair_files
    bad = _pcd(d / "nofields.pcd", [], pair.fixed_mm.numpy())
    res = runner.invoke(app, ["register", str(bad), str(d / "m.csv"), "-o", str(d / "out")])
    _one_line_error(res, str(bad))
    assert not (d / "out").exists()


# ----------------------------------------------------------------------------- bugs: volume training inputs
def test_pretrain_random_refuses_training_scans_too_small_for_the_network(tmp_path, one_intraop_thread):
    (tmp_path / "imagesTr").mkdir()
    names = []
    for n in range(1, 5):
        name = f"Small_{n:04d}_0000.nii.gz"
        _save(tmp_path / "imagesTr" / name, _blob((8, 16, 16), seed=n))
        names.append(name)
    ds = tmp_path / "Small_dataset.json"
    ds.write_text(json.dumps({"name": "small", "training": [{"image": f"./imagesTr/{n}"} for n in names],
                              "registration_val": [{"fixed": f"./imagesTr/{names[0]}",
                                                    "moving": f"./imagesTr/{names[1]}"}]}))
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / "run"), "--device", "cpu",
                              "--iterations", "1"])
    _one_line_error(res, "Small_000", "too small")
    assert not (tmp_path / "run").exists()


@pytest.fixture
def device_check(tmp_path, monkeypatch):
    """scripts/device_check.py with its ``.device`` folder moved into ``tmp_path`` (never the repository's)."""
    mod = load_script("scripts/device_check.py")
    monkeypatch.setattr(mod, "PREPARED", tmp_path / ".device")
    return mod


def test_device_check_prepare_names_a_missing_copd_dataset_in_one_line(device_check, tmp_path, capsys):
    code, err = _script_outcome(lambda: device_check.main(["prepare", "--copd", str(tmp_path / "nope"),
                                                           "--no-wheels"]), capsys)
    _assert_script_refused(code, err, str(tmp_path / "nope"))


def test_device_check_prepare_keeps_the_earlier_copy_when_a_pair_names_a_missing_file(device_check, tmp_path, capsys):
    src = tmp_path / "copd"
    src.mkdir()
    (src / "a.csv").write_text("x_mm,y_mm,z_mm\n1,2,3\n")
    (src / "dataset.json").write_text(json.dumps({"pairs": [
        {"id": "a", "fixed_keypoints": "a.csv", "moving_keypoints": "a.csv"},
        {"id": "b", "fixed_keypoints": "a.csv", "moving_keypoints": "gone.csv"}]}))
    earlier = tmp_path / ".device" / "copd-keypoints"
    earlier.mkdir(parents=True)
    (earlier / "dataset.json").write_text("{}")
    before = _listing(tmp_path / ".device")
    code, err = _script_outcome(lambda: device_check.main(["prepare", "--copd", str(src), "--no-wheels"]), capsys)
    _assert_script_refused(code, err, "gone.csv")
    assert _listing(tmp_path / ".device") == before


# ----------------------------------------------------------------------------- outputs among a run's own files
def _fake_run(folder: Path) -> Path:
    """A run directory as :func:`cyclereg.errors.run_dir_holding` knows one (run.json with kind and config)."""
    (folder / "fold1").mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"kind": "keypoints", "config": {}}))
    return folder


@pytest.mark.parametrize("name", ["run.json", "fold1/c.json", "fold1/final.pt", "log.jsonl"])
def test_compare_json_refuses_to_overwrite_a_runs_own_file(tmp_path, name):
    """compare --json RUN/run.json overwrote a run's record: an output file that would be one of a run
    directory's own files is refused before any work, whatever command writes it; the run is unchanged."""
    run = _fake_run(tmp_path / "run")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for path, tre in ((a, (2.0, 3.0)), (b, (1.0, 2.0))):  # two minimal keypoint reports of evaluate
        cases = [{"id": f"p{i}", "tre_after_mm": {"mean": v}, "sdlogj": 0.04} for i, v in enumerate(tre)]
        path.write_text(json.dumps({"dataset": "d.json", "method": path.stem, "cases": cases}))
    before = _listing(run)
    record = (run / "run.json").read_text()
    res = runner.invoke(app, ["compare", str(a), str(b), "--json", str(run / name)])
    _one_line_error(res, str(run / name), str(run))
    assert _listing(run) == before and (run / "run.json").read_text() == record


def test_a_report_beside_a_runs_files_is_still_written(tmp_path):
    from cyclereg.errors import require_output_file

    run = _fake_run(tmp_path / "run")
    assert require_output_file(run / "comparison.json") == run / "comparison.json"
    assert require_output_file(tmp_path / "run.json") == tmp_path / "run.json"  # not in a run directory


# ----------------------------------------------------------------------------- voxel-index landmarks of keypoints --pairs
@pytest.mark.parametrize("row, ok", [("23,27,31", True), ("0,0,0", True), ("24,5,5", False), ("5,-1,5", False),
                                     ("5,5,32", False), ("31,27,23", False)],
                         ids=["last_voxel", "first_voxel", "i_past", "j_negative", "k_past", "axes_reversed"])
def test_voxel_index_landmarks_must_lie_in_their_scan(tmp_path, row, ok):
    """keypoints --pairs took voxel-index landmarks far outside their 24 x 28 x 32 scan (index 400 in a 32-voxel
    axis): the indices are of another scan or in another axis order. Refused before any detection, naming the
    landmark file; an index inside the voxels (0 .. n - 1) passes the check."""
    from cyclereg.keypoints.api import build_keypoint_dataset

    for n in range(2):
        _save(tmp_path / f"s{n}.nii.gz", _blob(seed=n))
    (tmp_path / "good.csv").write_text("1,2,3\n4,5,6\n")
    (tmp_path / "lm.csv").write_text(f"1,2,3\n{row}\n")
    (tmp_path / "pairs.csv").write_text("id,fixed,moving,fixed_landmarks,moving_landmarks\n"
                                        "p,s0.nii.gz,s1.nii.gz,good.csv,lm.csv\n")
    if ok:  # the check passes; detection of the smooth blobs is not what is tested here
        from cyclereg.keypoints import api

        assert api._require_indices_inside(torch.tensor([[1.0, 2, 3], [float(v) for v in row.split(",")]]),
                                           tmp_path / "s1.nii.gz", tmp_path / "lm.csv") is None
        return
    with pytest.raises(InputError, match=r"landmark 1 at voxel index .* lies outside the scan .*s1\.nii\.gz of "
                                         r"shape \(24, 28, 32\) \(1 of 2 landmarks do\)") as info:
        build_keypoint_dataset(tmp_path / "pairs.csv", tmp_path / "out", verbose=False)
    assert str(tmp_path / "lm.csv") in str(info.value)
    assert not (tmp_path / "out").exists()
