"""Contracts of small mends of the keypoint evaluation's records and the keypoint dataset reader (2026-12-07).

Mended: the smoothness means of a keypoint evaluation report (``mean_sdlogj``, ``mean_std_logj``,
``mean_folding_fraction``) were taken over every case if the first case had the figure (a case without it: a
``KeyError``) and were ``None`` if the first had none (the others' figures dropped); they are now the mean over
the cases that have the figure, ``None`` only when none has it, the rule of the volume reports
(:func:`cyclereg.dense.api.summarize_pairs`), and the report says how many cases they are over
(``num_sdlogj_cases``).

A keypoint dataset whose pair ids differ only in letter case (``A`` and ``a``) was loaded, although training
writes a file per pair named by its id (``pseudo{t}.parts/{id}.pt``), which on a case-insensitive file system
(macOS, Windows) would be one file for both, one pair's pseudo label taken for the other's; it is now refused at
load (:func:`cyclereg.datasets.load_keypoint_dataset`) with one line naming the dataset file and the two ids.

``evaluate --folds K`` on keypoints where no pair of fold ``K`` has landmarks said "none of the pairs of fold K has
landmarks" without the option that made the selection; the line now begins ``--folds K:`` as the option's other
errors do (``--max-pairs 0`` and a fold out of range were one line naming the option already).

Each test checks exact analytic figures or the exact message fragment naming the file.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import cyclereg.clouds.api as cloud_api
from cyclereg.clouds.api import evaluate_keypoint_dataset
from cyclereg.datasets import load_keypoint_dataset
from cyclereg.errors import InputError
from cyclereg_cli.main import app

from conftest import write_two_pair_dataset

runner = CliRunner()
SMOOTHNESS = ("sdlogj", "std_logj", "folding_fraction")


def _grid_dataset(tmp_path):
    """:func:`write_two_pair_dataset` (pairs c0, c1) with a volume grid, so that SDlogJ is scored."""
    ds = write_two_pair_dataset(tmp_path)
    obj = json.loads(ds.read_text())
    obj.update(volume_shape_zyx=[20, 20, 20], spacing_zyx_mm=[10.0, 10.0, 10.0])
    ds.write_text(json.dumps(obj))
    return ds


def _scored_as(monkeypatch, figures: list[dict | None]):
    """Case ``n`` of the evaluation gets the smoothness figures ``figures[n]`` (``None``: it has none)."""
    evaluate_pair, calls = cloud_api._evaluate_pair, []

    def scored(*args, **kwargs):
        case = evaluate_pair(*args, **kwargs)
        for key in SMOOTHNESS:
            case.pop(key, None)
        case.update(figures[len(calls)] or {})
        calls.append(case["id"])
        return case

    monkeypatch.setattr(cloud_api, "_evaluate_pair", scored)


@pytest.mark.parametrize("figures", [
    [None, {"sdlogj": 0.5, "std_logj": 0.25, "folding_fraction": 0.125}],
    [{"sdlogj": 0.5, "std_logj": 0.25, "folding_fraction": 0.125}, None],
], ids=["first-case-unscored", "second-case-unscored"])
def test_keypoint_smoothness_means_are_over_the_cases_that_have_them(tmp_path, monkeypatch, figures):
    ds = _grid_dataset(tmp_path)
    _scored_as(monkeypatch, figures)
    r = evaluate_keypoint_dataset(ds, tmp_path / "r.json", identity=True, device="cpu", quiet=True)
    assert (r["mean_sdlogj"], r["mean_std_logj"], r["mean_folding_fraction"]) == (0.5, 0.25, 0.125)
    assert r["num_sdlogj_cases"] == 1 and r["num_pairs"] == 2
    assert json.loads((tmp_path / "r.json").read_text())["mean_sdlogj"] == 0.5


def test_keypoint_smoothness_means_of_every_case_and_of_none(tmp_path, monkeypatch):
    ds = _grid_dataset(tmp_path)
    _scored_as(monkeypatch, [{"sdlogj": 0.5, "std_logj": 0.25, "folding_fraction": 0.0},
                             {"sdlogj": 0.25, "std_logj": 0.5, "folding_fraction": 0.5}])
    r = evaluate_keypoint_dataset(ds, tmp_path / "r.json", identity=True, device="cpu", quiet=True)
    assert (r["mean_sdlogj"], r["mean_std_logj"], r["mean_folding_fraction"]) == (0.375, 0.375, 0.25)
    assert r["num_sdlogj_cases"] == 2
    monkeypatch.undo()
    r = evaluate_keypoint_dataset(ds, tmp_path / "r.json", identity=True, device="cpu", quiet=True, smoothness=False)
    assert (r["mean_sdlogj"], r["mean_std_logj"], r["mean_folding_fraction"], r["num_sdlogj_cases"]) == (
        None, None, None, 0)


@pytest.mark.parametrize("ids", [("A", "a"), ("copd01", "COPD01"), ("Pair-1", "pair-1")])
def test_a_keypoint_dataset_with_ids_that_differ_only_in_letter_case_is_refused(tmp_path, ids):
    ds = write_two_pair_dataset(tmp_path)
    obj = json.loads(ds.read_text())
    (obj["pairs"][0]["id"], obj["pairs"][1]["id"]), obj["folds"] = ids, [[ids[0]], [ids[1]]]
    ds.write_text(json.dumps(obj))
    with pytest.raises(InputError) as err:
        load_keypoint_dataset(ds)
    message = str(err.value)
    assert message.startswith(f"{ds}: pair ids {ids[0]!r} and {ids[1]!r} differ only in letter case")
    assert "case-insensitive file system" in message and "\n" not in message
    res = runner.invoke(app, ["evaluate", str(ds), "--identity", "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 2, res.output
    assert f"pair ids {ids[0]!r} and {ids[1]!r} differ only in letter case" in " ".join(res.output.split())
    assert "Traceback" not in res.output and not (tmp_path / "r.json").exists()


def test_keypoint_ids_distinct_in_letter_case_still_load(tmp_path):
    ds = write_two_pair_dataset(tmp_path)
    obj = json.loads(ds.read_text())
    (obj["pairs"][0]["id"], obj["pairs"][1]["id"]), obj["folds"] = ("a_b", "a b"), [["a_b"], ["a b"]]
    ds.write_text(json.dumps(obj))
    assert [p.id for p in load_keypoint_dataset(ds).pairs] == ["a_b", "a b"]


@pytest.mark.parametrize("args, said", [
    (["--folds", "2"], "nolm.json: --folds 2: none of the pairs of fold 2 has landmarks (fixed_landmarks and "
                       "moving_landmarks): there is no TRE to evaluate"),
    (["--folds", "2", "--max-pairs", "1"], "nolm.json: --folds 2: none of the pairs of fold 2 has landmarks"),
    (["--max-pairs", "0"], "--max-pairs 0: need 1 or more"),
    (["--folds", "3"], "nolm.json: --folds 3: expected 'all' or 1..2"),
])
def test_an_evaluate_selection_of_no_scorable_pair_is_one_line_naming_the_option(tmp_path, args, said):
    ds = write_two_pair_dataset(tmp_path)
    obj = json.loads(ds.read_text())
    for key in ("fixed_landmarks", "moving_landmarks"):  # fold 2 holds out c1 alone, now without landmarks
        obj["pairs"][1].pop(key)
    (tmp_path / "nolm.json").write_text(json.dumps(obj))
    res = runner.invoke(app, ["evaluate", str(tmp_path / "nolm.json"), "--identity", *args,
                              "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 2 and said in res.output and res.output.count("\n") == 1, res.output
    assert not (tmp_path / "r.json").exists()


def test_a_pairs_csv_with_ids_that_differ_only_in_letter_case_is_refused(tmp_path):
    """``keypoints --pairs``: its ids name the point files (``A_fixed.csv`` and ``a_fixed.csv``, one file on a
    case-insensitive file system), so such a pairs CSV is refused when read, naming both ids and the CSV."""
    from cyclereg.errors import InputError
    from cyclereg.keypoints.api import read_pairs_csv

    for name in ("f.nii.gz", "m.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    csv = tmp_path / "pairs.csv"
    csv.write_text("id,fixed,moving\nA,f.nii.gz,m.nii.gz\na,m.nii.gz,f.nii.gz\n")
    with pytest.raises(InputError, match=r"pairs\.csv: pair ids 'A' and 'a' differ only in letter case"):
        read_pairs_csv(csv)
    csv.write_text("id,fixed,moving\nA,f.nii.gz,m.nii.gz\nb,m.nii.gz,f.nii.gz\n")
    assert [p.id for p in read_pairs_csv(csv)] == ["A", "b"]
