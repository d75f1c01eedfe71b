"""``cyclereg compare``: paired statistics against hand-computed values, and its input errors."""

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cyclereg.compare import compare_reports, paired_statistics
from cyclereg.errors import InputError
from cyclereg_cli.main import app

runner = CliRunner()


def keypoint_report(path, tre: dict, dataset="copd.json"):
    """A minimal keypoint ``evaluate`` report with the given mean TRE per case [mm]."""
    cases = [{"id": k, "tre_after_mm": {"mean": v}, "sdlogj": 0.04} for k, v in tre.items()]
    path.write_text(json.dumps({"dataset": dataset, "method": path.stem, "cases": cases}))
    return path


def volume_report(path, dice: dict, complete=True):
    pairs = [{"id": k, "dice": v, "hd95_mm": 30.0, "sdlogj": 0.1} for k, v in dice.items()]
    path.write_text(json.dumps({"dataset": "abd.json", "method": path.stem, "complete": complete, "pairs": pairs}))
    return path


def test_all_pairs_better_gives_the_exact_extreme_p_values():
    base = [5.0 + i for i in range(10)]
    other = [b - 0.1 * (i + 1) for i, b in enumerate(base)]  # distinct gains: exact signed-rank distribution
    s = paired_statistics(base, other, lower_is_better=True)
    assert (s["better"], s["worse"], s["tied"]) == (10, 0, 0)
    assert s["mean_difference"] == pytest.approx(-0.55)
    assert s["median_difference"] == pytest.approx(-0.55)
    # W+ = 0 has probability 2^-10 under the null; two-sided doubles it; the sign test: the same
    assert s["wilcoxon_p"] == pytest.approx(2 / 1024)
    assert s["sign_test_p"] == pytest.approx(2 / 1024)


def test_direction_and_small_exact_case():
    # differences +1, -2, -3 with TRE (lower better): two pairs better, one worse
    s = paired_statistics([10.0, 10.0, 10.0], [11.0, 8.0, 7.0], lower_is_better=True)
    assert (s["better"], s["worse"]) == (2, 1)
    # signed ranks 1, 2, 3: W+ = 1; P(W+ <= 1) = 2/8 over the 8 sign patterns, two-sided 0.5
    assert s["wilcoxon_p"] == pytest.approx(0.5)
    assert s["sign_test_p"] == pytest.approx(1.0)  # 2 of 3: binomial two-sided p = 1
    # the same numbers as Dice (higher better): the counts swap
    d = paired_statistics([10.0, 10.0, 10.0], [11.0, 8.0, 7.0], lower_is_better=False)
    assert (d["better"], d["worse"]) == (1, 2)


def test_confidence_interval_is_the_student_t_interval():
    s = paired_statistics([0.0, 0.0, 0.0], [1.0, 2.0, 3.0], lower_is_better=False)
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2 dof) * sd 1 / sqrt(3)
    assert s["mean_difference"] == pytest.approx(2.0)
    assert s["ci95"] == pytest.approx([2.0 - half, 2.0 + half])


def test_holm_adjustment_by_hand():
    from cyclereg.compare import holm_adjusted

    # sorted 0.01, 0.03, 0.04 -> 3 x 0.01, 2 x 0.03, then max(0.06, 1 x 0.04): back in the given order
    assert holm_adjusted([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm_adjusted([0.2]) == [0.2]  # one comparison: unchanged
    assert holm_adjusted([0.6, 0.5]) == [1.0, 1.0]  # capped at 1, and monotone
    assert holm_adjusted([]) == []


def test_several_reports_get_holm_adjusted_p_values(tmp_path):
    """Three reports against one base: each comparison's own p-values, and Holm's over the three."""
    base = keypoint_report(tmp_path / "base.json", {f"c{i}": 10.0 for i in range(10)})
    others = [keypoint_report(tmp_path / "all_better.json", {f"c{i}": 9.9 - 0.1 * i for i in range(10)}),
              keypoint_report(tmp_path / "mixed.json", {f"c{i}": 10.0 + (0.1 * (i + 1) if i % 3 == 0 else -0.1 * (i + 1))
                                                        for i in range(10)}),
              keypoint_report(tmp_path / "same.json", {f"c{i}": 10.0 for i in range(10)})]
    out = tmp_path / "cmp.json"
    res = runner.invoke(app, ["compare", str(base), *map(str, others), "--json", str(out)])
    assert res.exit_code == 0, res.output
    comps = json.loads(out.read_text())["comparisons"]
    for key in ("wilcoxon_p", "sign_test_p"):
        better, mixed, same = (c[key] for c in comps)
        assert better == pytest.approx(2 / 1024) and same == 1.0 and better < mixed < same
        # ranks 1, 2, 3: the smallest times three, the next times two (not below the first), the last once
        assert [c[f"{key}_holm"] for c in comps] == pytest.approx([3 * better, max(3 * better, min(1.0, 2 * mixed)), 1.0])
    assert "Wilcoxon p (Holm)" in res.output
    # a single comparison: the adjusted value is the raw one, and the table has no Holm column
    one = compare_reports([base, others[0]], quiet=True)["comparisons"][0]
    assert one["wilcoxon_p_holm"] == one["wilcoxon_p"]
    assert "(Holm)" not in runner.invoke(app, ["compare", str(base), str(others[0])]).output


def test_identical_reports_are_all_tied(tmp_path):
    a = keypoint_report(tmp_path / "a.json", {"c1": 2.0, "c2": 3.0})
    r = compare_reports([a, a], quiet=True)
    c = r["comparisons"][0]
    assert (c["tied"], c["mean_difference"], c["wilcoxon_p"], c["sign_test_p"]) == (2, 0.0, 1.0, 1.0)
    assert r["metric"] == "tre" and r["lower_is_better"]


def test_reports_match_pairs_by_id_and_leave_out_missing_values(tmp_path):
    a = volume_report(tmp_path / "a.json", {"p1": 0.3, "p2": 0.4, "p3": 0.5, "p4": 0.2})
    # another order, p4 missing, p5 extra, p3 without a finite value
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"dataset": "abd.json", "pairs": [
        {"id": "p2", "dice": 0.5}, {"id": "p1", "dice": 0.25}, {"id": "p3", "dice": None}, {"id": "p5", "dice": 0.9}]}))
    out = tmp_path / "cmp.json"
    r = compare_reports([a, b], out, quiet=True)
    c = r["comparisons"][0]
    assert r["metric"] == "dice" and not r["lower_is_better"]
    assert c["left_out"] == ["p3"] and c["n"] == 2
    assert {p["id"]: (p["base"], p["other"]) for p in c["pairs"]} == {"p1": (0.3, 0.25), "p2": (0.4, 0.5)}
    assert (c["better"], c["worse"]) == (1, 1)
    assert c["mean_difference"] == pytest.approx(0.025)
    assert json.loads(out.read_text())["comparisons"][0]["n"] == 2


def test_left_out_pairs_are_said_and_a_value_that_is_no_number_is_a_damaged_report(tmp_path):
    """A pair without a value (null) was left out without a word (only the JSON's left_out had it): now a note
    names it; a value that is text ("abc") was left out too, as if it were missing: now refused, naming the
    report and the pair."""
    a = keypoint_report(tmp_path / "a.json", {"c1": 2.0, "c2": 3.0, "c3": 4.0})
    b = keypoint_report(tmp_path / "b.json", {"c1": 1.0, "c2": 2.0, "c3": 5.0})
    obj = json.loads(b.read_text())
    obj["cases"][2]["tre_after_mm"]["mean"] = None
    b.write_text(json.dumps(obj))
    res = runner.invoke(app, ["compare", str(a), str(b)])
    said = " ".join(res.output.split())
    assert res.exit_code == 0 and "1 shared pair left out, without a tre value in this report or the base (c3)" in said
    obj["cases"][1]["tre_after_mm"]["mean"] = "abc"
    b.write_text(json.dumps(obj))
    res = runner.invoke(app, ["compare", str(a), str(b)])
    said = " ".join(res.output.split())
    assert res.exit_code == 2 and str(b) in said and "pair 'c2': tre_after_mm.mean is 'abc', not a number" in said


def test_cli_compare_writes_the_comparison(tmp_path):
    a = keypoint_report(tmp_path / "a.json", {f"c{i}": 10.0 for i in range(4)})
    b = keypoint_report(tmp_path / "b.json", {f"c{i}": 9.0 - i for i in range(4)})
    out = tmp_path / "cmp.json"
    res = runner.invoke(app, ["compare", str(a), str(b), "--json", str(out)])
    assert res.exit_code == 0, res.output
    written = json.loads(out.read_text())
    c = written["comparisons"][0]
    assert c["mean_difference"] == pytest.approx(-2.5) and c["better"] == 4
    assert "better / worse / tied" in res.output
    # where and when, as every other record: the relative paths it holds are relative to the directory
    assert written["command"] == "compare" and {"cyclereg_version", "date", "machine"} <= set(written)
    assert written["working_directory"] == str(Path.cwd())


@pytest.mark.parametrize("case, message", [
    ("one", "at least two reports"),
    ("kind", "is a volume report"),
    ("metric", "--metric tre is a figure of keypoint reports"),
    ("unknown_metric", "--metric must be one of"),
    ("not_json", "not valid JSON"),
    ("deep", "not valid JSON (RecursionError"),
    ("huge_int", "not valid JSON (ValueError"),
    ("not_object", "expected a JSON object"),
    ("not_report", "not a cyclereg evaluate report"),
    ("dataset", "a keypoint dataset, not an evaluate report"),
    ("no_pairs", "no pairs in the report"),
    ("twice", "is listed more than once"),
    ("disjoint", "has none of the pairs"),
    ("missing", "file does not exist"),
    ("overwrite", "is one of the reports being compared"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case, message):
    k = keypoint_report(tmp_path / "k.json", {"c1": 1.0})
    v = volume_report(tmp_path / "v.json", {"p1": 0.3})
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "deep.json").write_text("[" * 100000)
    (tmp_path / "huge.json").write_text('{"cases": [{"id": "c1", "tre_mm": ' + "9" * 5000 + "}]}")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "plain.json").write_text('{"mean_tre_mm": 2.0}')
    (tmp_path / "empty.json").write_text('{"cases": []}')
    (tmp_path / "twice.json").write_text('{"cases": [{"id": "c1"}, {"id": "c1"}]}')
    (tmp_path / "dataset.json").write_text('{"pairs": [{"id": "c1", "fixed_keypoints": "f.csv", "moving_keypoints": "m.csv"}]}')
    other = keypoint_report(tmp_path / "o.json", {"c9": 1.0})
    out = tmp_path / "cmp.json"
    args = {"one": [k], "kind": [k, v], "metric": [v, v, "--metric", "tre"], "unknown_metric": [k, k, "--metric", "x"],
            "not_json": [k, tmp_path / "bad.json"], "deep": [k, tmp_path / "deep.json"], "huge_int": [k, tmp_path / "huge.json"], "not_object": [tmp_path / "list.json", k],
            "not_report": [tmp_path / "plain.json", k], "dataset": [k, tmp_path / "dataset.json"], "no_pairs": [k, tmp_path / "empty.json"],
            "twice": [k, tmp_path / "twice.json"],
            "disjoint": [k, other], "missing": [k, tmp_path / "nope.json"], "overwrite": [k, k]}[case]
    target = k if case == "overwrite" else out
    before = target.read_text() if target.exists() else None
    res = runner.invoke(app, ["compare", *map(str, args), "--json", str(target)])
    assert res.exit_code == 2
    assert message in res.output and len(res.output.strip().splitlines()) == 1
    assert (target.read_text() if target.exists() else None) == before


def test_library_errors_are_input_errors(tmp_path):
    k = keypoint_report(tmp_path / "k.json", {"c1": 1.0})
    with pytest.raises(InputError, match="metric"):
        compare_reports([k, k], metric="dice", quiet=True)


def test_one_label_by_number_or_name(tmp_path):
    names = {"1": "spleen", "6": "liver"}

    def report(path, liver: dict):
        pairs = [{"id": k, "dice": 0.5, "dice_per_label": {"1": 0.4, **({"6": v} if v is not None else {})},
                  "hd95_per_label_mm": {"1": 10.0, "6": 20.0}} for k, v in liver.items()]
        path.write_text(json.dumps({"dataset": "abd.json", "label_names": names, "pairs": pairs}))
        return path

    a = report(tmp_path / "a.json", {"p1": 0.7, "p2": 0.8, "p3": 0.6})
    b = report(tmp_path / "b.json", {"p1": 0.9, "p2": 0.7, "p3": None})  # p3 has no liver in b
    by_name = compare_reports([a, b], label="Liver", quiet=True)
    by_id = compare_reports([a, b], label="6", quiet=True)
    assert by_name["comparisons"] == by_id["comparisons"] and by_name["label"] == {"id": "6", "name": "liver"}
    c = by_name["comparisons"][0]
    assert c["left_out"] == ["p3"] and (c["better"], c["worse"]) == (1, 1)
    assert c["mean_difference"] == pytest.approx(((0.9 - 0.7) + (0.7 - 0.8)) / 2)
    assert compare_reports([a, b], label="liver", metric="hd95", quiet=True)["comparisons"][0]["tied"] == 3
    with pytest.raises(InputError, match="not a label of this report .*6 liver"):
        compare_reports([a, b], label="lung", quiet=True)
    with pytest.raises(InputError, match="not a label"):
        compare_reports([a, b], label="7", quiet=True)
    with pytest.raises(InputError, match="not a label"):  # a digit to str.isdigit, not a number to int()
        compare_reports([a, b], label="\u00b2", quiet=True)
    listed = json.loads(a.read_text())
    listed["label_names"] = ["spleen", "liver"]
    (tmp_path / "listed.json").write_text(json.dumps(listed))
    with pytest.raises(InputError, match="'label_names' should map label numbers to names"):
        compare_reports([tmp_path / "listed.json", b], label="1", quiet=True)
    with pytest.raises(InputError, match="--label goes with --metric dice or hd95"):
        compare_reports([a, b], label="liver", metric="sdlogj", quiet=True)
    k = keypoint_report(tmp_path / "k.json", {"c1": 1.0})
    with pytest.raises(InputError, match="--label is an option for volume reports"):
        compare_reports([k, k], label="1", quiet=True)


def test_counts_are_singular_for_one():
    from cyclereg.console import count

    assert [count(n, "pair") for n in (0, 1, 2)] == ["0 pairs", "1 pair", "2 pairs"]


def _strict_json(text: str):
    """Parse as strict JSON: Python's NaN / Infinity / -Infinity tokens are an error."""
    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def test_figures_beyond_float_range_are_written_as_strict_json(tmp_path):
    """Finite values near +-1e308 overflow the differences and the mean to inf (and the spread to NaN):
    the comparison file stays strict JSON, those figures as null, the finite ones as computed."""
    a = keypoint_report(tmp_path / "a.json", {"c1": 1e308, "c2": -1e308, "c3": 1.0})
    b = keypoint_report(tmp_path / "b.json", {"c1": -1e308, "c2": 1e308, "c3": 2.0})
    out = tmp_path / "cmp.json"
    res = runner.invoke(app, ["compare", str(a), str(b), "--json", str(out)])
    assert res.exit_code == 0, res.output
    c = _strict_json(out.read_text())["comparisons"][0]
    assert c["mean_difference"] is None and c["ci95"] == [None, None]
    assert (c["n"], c["better"], c["worse"]) == (3, 1, 2)
    assert c["pairs"][2] == {"id": "c3", "base": 1.0, "other": 2.0}


def test_one_value_near_the_float_limit_gives_a_null_spread_not_an_overflow(tmp_path):
    """A finite mean whose squared deviations overflow (one pair at 1e308): the interval is null, the
    command does not stop with an OverflowError traceback."""
    a = keypoint_report(tmp_path / "a.json", {"c1": 1.0, "c2": 2.0, "c3": 3.0})
    b = keypoint_report(tmp_path / "b.json", {"c1": 1e308, "c2": 2.5, "c3": 3.5})
    out = tmp_path / "cmp.json"
    res = runner.invoke(app, ["compare", str(a), str(b), "--json", str(out)])
    assert res.exit_code == 0, res.output
    c = _strict_json(out.read_text())["comparisons"][0]
    assert c["mean_difference"] == pytest.approx((1e308 - 1.0 + 0.5 + 0.5) / 3)
    assert c["ci95"] == [None, None] and (c["better"], c["worse"]) == (0, 3)


def test_write_json_turns_non_finite_floats_into_null(tmp_path):
    from cyclereg.checkpoint import write_json
    out = tmp_path / "r.json"
    write_json(out, {"nan": float("nan"), "inf": [float("inf"), -math.inf], "ok": 0.5, "n": 3, "flag": True})
    assert _strict_json(out.read_text()) == {"nan": None, "inf": [None, None], "ok": 0.5, "n": 3, "flag": True}


def test_a_report_compared_with_itself_is_said(tmp_path, capsys):
    """Allowed (every difference 0), but said: given twice by mistake it would also count in Holm's
    adjustment of the others."""
    a = keypoint_report(tmp_path / "a.json", {"c1": 1.0, "c2": 2.0})
    b = keypoint_report(tmp_path / "b.json", {"c1": 1.5, "c2": 1.0})
    r = compare_reports([a, tmp_path / "." / "a.json", b, b])
    err = " ".join(capsys.readouterr().err.split())
    assert "a.json is the same file as the base: its comparison is identical by construction" in err
    assert f"{b} is the same file as {b}" in err and r["comparisons"][0]["mean_difference"] == 0


def test_sign_test_drops_tied_pairs():
    # 2 better, 0 worse, 3 tied: two-sided binomial test of 2 of 2 at p=0.5 -> 2 * 0.5**2 = 0.5
    # (counting the ties as trials, binomtest(2, 5) gives 1.0)
    from cyclereg.compare import paired_statistics

    s = paired_statistics([1.0] * 5, [0.0, 0.0, 1.0, 1.0, 1.0], lower_is_better=True)
    assert (s["better"], s["worse"], s["tied"]) == (2, 0, 3)
    assert math.isclose(s["sign_test_p"], 0.5, rel_tol=1e-12)
