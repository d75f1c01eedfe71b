"""Paired comparison of ``evaluate`` reports: ``cyclereg compare BASE.json OTHER.json ...``.

Two registrations of the same pairs differ pair by pair far less than their means suggest or hide
(a 0.01 Dice gain can be 40 of 45 pairs better or a few large changes). :func:`compare_reports`
matches the pairs of the reports by id and gives, for each report against the first, the mean
and median paired difference, how many pairs improved or got worse (in the metric's own sense:
lower is better for TRE, HD95 and SDlogJ, higher for Dice), a 95 % confidence interval of the mean
difference (Student t over the pairs) and two-sided p-values of the Wilcoxon signed-rank test and
of the sign test. With several reports against one base, each p-value is also given adjusted for
the number of comparisons by Holm's step-down method (:func:`holm_adjusted`, ``wilcoxon_p_holm``,
``sign_test_p_holm``): reject where the adjusted value is below the level, and the chance of any false
rejection among the comparisons stays within it. Only the reports are read (no scans, no landmarks).

Per-pair values (report field -> metric):

* keypoint reports (``cases``): ``tre`` = ``tre_after_mm.mean`` [mm], ``sdlogj`` = ``sdlogj``;
* volume reports (``pairs``): ``dice`` = ``dice``, ``hd95`` = ``hd95_mm`` [mm], ``sdlogj`` = ``sdlogj``;
  with a ``label`` (number or name, e.g. ``liver``): that label's ``dice_per_label`` /
  ``hd95_per_label_mm`` entry.

A pair whose value is missing or not finite in either report is left out of that comparison
(counted in ``left_out``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from cyclereg.datasets import is_label_number, read_json, require_pair_ids
from cyclereg.errors import (InputError, finite_number, path_list, refuse_empty_paths, require_output_file,
                             require_switches, same_path)

__all__ = ["Metric", "METRICS", "compare_reports", "paired_statistics"]


@dataclass(frozen=True)
class Metric:
    """One per-pair figure of an ``evaluate`` report."""

    name: str
    #: report kind the metric exists for: "keypoints" (``cases``) or "volumes" (``pairs``); None: both
    kind: str | None
    #: path of the value in a pair record, e.g. ("tre_after_mm", "mean")
    field: tuple[str, ...]
    lower_is_better: bool
    unit: str


METRICS: dict[str, Metric] = {
    "tre": Metric("tre", "keypoints", ("tre_after_mm", "mean"), True, "mm"),
    "dice": Metric("dice", "volumes", ("dice",), False, ""),
    "hd95": Metric("hd95", "volumes", ("hd95_mm",), True, "mm"),
    "sdlogj": Metric("sdlogj", None, ("sdlogj",), True, ""),
}
DEFAULT_METRIC = {"keypoints": "tre", "volumes": "dice"}
_KIND_WORD = {"keypoints": "keypoint", "volumes": "volume"}

#: per-label field of a volume pair record, per metric
_PER_LABEL = {"dice": "dice_per_label", "hd95": "hd95_per_label_mm"}

#: two-sided level of the confidence interval of the mean difference
CONFIDENCE = 0.95


def _load(path: Path) -> tuple[str, dict, dict[str, dict]]:
    """(kind, report, {pair id: record}) of one ``evaluate`` report; :class:`InputError` naming
    ``path`` if it is not one (read and checked as every JSON input is: :func:`read_json`,
    :func:`require_pair_ids`)."""
    report = read_json(path)
    kind = "keypoints" if isinstance(report.get("cases"), list) else (
        "volumes" if isinstance(report.get("pairs"), list) else None)
    if kind is None:
        raise InputError("not a cyclereg evaluate report (no 'cases' or 'pairs' list)", path)
    if kind == "volumes" and any(isinstance(r, dict) and "fixed_keypoints" in r for r in report["pairs"]):
        raise InputError("a keypoint dataset, not an evaluate report", path)  # it lists 'pairs' too
    records = report["cases" if kind == "keypoints" else "pairs"]
    if not all(isinstance(r, dict) and "id" in r for r in records):
        raise InputError("a pair record has no 'id'", path)
    ids = [str(r["id"]) for r in records]
    require_pair_ids(ids, path, "the report")
    return kind, report, dict(zip(ids, records))


def _label_id(label: str, report: dict, path: Path) -> tuple[str, str | None]:
    """(id, name) of ``label`` (its number, or its name in the report's ``label_names``, any case)."""
    given = report.get("label_names") or {}
    if not isinstance(given, dict):
        raise InputError("'label_names' should map label numbers to names", path)
    names = {str(k): str(v) for k, v in given.items()}
    listed = ", ".join(f"{k} {v}" for k, v in names.items())
    if is_label_number(label.strip()):
        lid = str(int(label))
        if names and lid not in names:
            raise InputError(f"--label {label} is not a label of this report (labels: {listed})", path)
        return lid, names.get(lid)
    found = [k for k, v in names.items() if v.lower() == label.strip().lower()]
    if not found:
        raise InputError(f"--label {label!r} is not a label of this report "
                         f"({'labels: ' + listed if names else 'it names none; give the label number'})", path)
    return found[0], names[found[0]]


LEFT_OUT_SHOWN = 5
"""How many ids of the pairs a comparison leaves out its note lists (all are in the JSON's ``left_out``)."""


def _value(record: dict, metric: Metric, path: Path | None = None) -> float | None:
    """The metric's value in a pair's ``record``; ``None`` where the report has none (absent, ``null``: not
    computed, or not finite). A value that is no number at all (text, a list) is a damaged report:
    :class:`InputError` naming ``path`` and the pair."""
    value = record
    for key in metric.field:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    if not finite_number(value):
        raise InputError(f"pair {record.get('id')!r}: {'.'.join(map(str, metric.field))} is {value!r}, not a number "
                         "(a damaged report?)", path)
    return float(value)


def paired_statistics(base: list[float], other: list[float], *, lower_is_better: bool) -> dict:
    """Paired comparison of ``other`` against ``base`` (same pairs, same order).

    Returns ``n``, ``base_mean``, ``other_mean``, ``mean_difference`` and ``median_difference``
    (other - base, the metric's unit), ``ci95`` (Student-t interval of the mean difference; None
    for fewer than 2 pairs), ``better`` / ``worse`` / ``tied`` (pairs where ``other`` is better,
    worse, equal in the metric's sense), ``wilcoxon_p`` (two-sided signed-rank test, tied pairs
    dropped; 1.0 when every pair is tied) and ``sign_test_p`` (two-sided binomial test of better
    against worse)."""
    from scipy import stats

    n = len(base)
    if n != len(other) or n == 0:
        raise ValueError(f"paired_statistics: base and other need the same, non-zero length (got {n}, {len(other)})")
    diffs = [o - b for b, o in zip(base, other)]
    better = sum((d < 0) if lower_is_better else (d > 0) for d in diffs)
    worse = sum((d > 0) if lower_is_better else (d < 0) for d in diffs)
    mean = sum(diffs) / n
    ci = None
    if n > 1:
        sd = math.sqrt(sum((d - mean) * (d - mean) for d in diffs) / (n - 1))  # inf, not OverflowError, near 1e308
        half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / math.sqrt(n)
        ci = [mean - half, mean + half]
    nonzero = [d for d in diffs if d != 0]
    wilcoxon_p = float(stats.wilcoxon(nonzero).pvalue) if nonzero else 1.0
    sign_p = float(stats.binomtest(better, better + worse, 0.5).pvalue) if better + worse else 1.0
    ordered = sorted(diffs)
    median = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
    return {"n": n, "base_mean": sum(base) / n, "other_mean": sum(other) / n, "mean_difference": mean,
            "median_difference": median, "ci95": ci, "better": better, "worse": worse, "tied": n - better - worse,
            "wilcoxon_p": wilcoxon_p, "sign_test_p": sign_p}


def holm_adjusted(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of ``m`` p-values, in their order: sorted ascending, the ``i``-th
    smallest (from 1) becomes ``min(1, (m - i + 1) p)``, then each at least the one before it. E.g.
    ``[0.01, 0.04, 0.03]`` -> ``[0.03, 0.06, 0.06]``; one p-value stays as it is."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def compare_reports(reports: list[Path | str], output: Path | str | None = None, *, metric: str | None = None,
                    label: str | None = None, quiet: bool = False) -> dict:
    """Compare every report after the first against the first, pair by pair (see the module).

    ``reports``: two or more ``evaluate`` JSON reports of the same kind (keypoint or volume);
    ``metric``: one of :data:`METRICS` (default: ``tre`` for keypoint reports, ``dice`` for volume
    reports); ``label``: volume reports, one label's Dice or HD95 (its number or name); ``output``:
    also write the comparison there as JSON (atomically). Prints a table
    (unless ``quiet``) and returns the comparison: ``metric``, ``lower_is_better``, ``unit``,
    ``base`` and per other report its statistics (:func:`paired_statistics`), ``left_out`` pairs
    and the per-pair values. :class:`InputError` names the report that does not fit."""
    from rich.markup import escape
    from rich.table import Table

    from cyclereg.checkpoint import json_text, write_json
    from cyclereg.device import provenance
    from cyclereg.console import count, make_console, print_note, print_table

    reports = path_list(reports, "reports", "two or more report files")
    refuse_empty_paths({"reports": reports, "output": output}, lists=("reports",))
    require_switches({"quiet": quiet})
    paths = [Path(p) for p in reports]
    if len(paths) < 2:
        raise InputError("compare needs at least two reports: the base and one to compare with it")
    if output is not None:
        output = require_output_file(output)
        if output.resolve() in {p.resolve() for p in paths}:
            raise InputError("is one of the reports being compared; write the comparison elsewhere", output)
    loaded = [_load(p) for p in paths]
    kind = loaded[0][0]
    for p, (k, _, _) in zip(paths[1:], loaded[1:]):
        if k != kind:
            raise InputError(f"is a {_KIND_WORD[k]} report, the base {paths[0]} a {_KIND_WORD[kind]} report: they score "
                             "different things", p)
    name = metric if metric is not None else DEFAULT_METRIC[kind]
    if name not in METRICS:
        raise InputError(f"--metric must be one of {', '.join(METRICS)} (got {name!r})")
    m = METRICS[name]
    if m.kind is not None and m.kind != kind:
        fits = ", ".join(k for k, v in METRICS.items() if v.kind in (None, kind))
        raise InputError(f"--metric {name} is a figure of {_KIND_WORD[m.kind]} reports; these are {_KIND_WORD[kind]} "
                         f"reports ({fits})")
    base_path, (_, base_report, base_pairs) = paths[0], loaded[0]
    label_id = label_name = None
    if label is not None:
        if kind != "volumes":
            raise InputError("--label is an option for volume reports (one label's Dice or HD95)")
        if name not in _PER_LABEL:
            raise InputError(f"--label goes with --metric {' or '.join(_PER_LABEL)}, not {name}")
        label_id, label_name = _label_id(label, base_report, base_path)
        m = replace(m, field=(_PER_LABEL[name], label_id))
        name_shown = f"{name} of label {label_id}" + (f" ({label_name})" if label_name else "")
    else:
        name_shown = name
    if not any(_value(r, m, base_path) is not None for r in base_pairs.values()):
        raise InputError(f"the report has no {name_shown} values", base_path)
    for i, p in enumerate(paths[1:], start=1):
        twin = next((q for q in paths[:i] if same_path(p, q)), None)
        if twin is not None:  # allowed (a quick check), but every difference is 0 and it counts in Holm's adjustment
            print_note(f"{p} is the same file as {'the base' if twin == paths[0] else twin}: its comparison is "
                       "identical by construction", quiet=quiet)
    comparisons = []
    for p, (_, report, pairs) in zip(paths[1:], loaded[1:]):
        common = [pid for pid in base_pairs if pid in pairs]
        if not common:
            raise InputError(f"has none of the pairs of the base {base_path}", p)
        if report.get("dataset") != base_report.get("dataset"):
            print_note(f"{p} evaluated {report.get('dataset')}, the base {base_report.get('dataset')}; "
                       "pairs are matched by id", quiet=quiet)
        only = (len(base_pairs) - len(common), len(pairs) - len(common))
        if any(only):
            print_note(f"{p} and the base share {count(len(common), 'pair')} ({only[0]} only in the base, {only[1]} "
                       "only in this report); the comparison uses the shared ones", quiet=quiet)
        if report.get("complete") is False:
            print_note(f"{p} is an unfinished evaluation (complete: false)", quiet=quiet)
        values = [(pid, _value(base_pairs[pid], m, base_path), _value(pairs[pid], m, p)) for pid in common]
        kept = [(pid, b, o) for pid, b, o in values if b is not None and o is not None]
        left_out = [pid for pid, b, o in values if b is None or o is None]
        if not kept:
            raise InputError(f"has no {name_shown} value for any pair it shares with the base {base_path}", p)
        if left_out:
            shown = ", ".join(map(str, left_out[:LEFT_OUT_SHOWN])) + (", ..." if len(left_out) > LEFT_OUT_SHOWN else "")
            print_note(f"{p}: {count(len(left_out), 'shared pair')} left out, without a {name_shown} value in this "
                       f"report or the base ({shown}); the comparison uses {count(len(kept), 'pair')}", quiet=quiet)
        stats = paired_statistics([b for _, b, _ in kept], [o for _, _, o in kept], lower_is_better=m.lower_is_better)
        comparisons.append({"report": str(p), "method": report.get("method"), **stats, "left_out": left_out,
                            "pairs": [{"id": pid, "base": b, "other": o} for pid, b, o in kept]})
    for key in ("wilcoxon_p", "sign_test_p"):  # over the comparisons against this base
        for c, adjusted in zip(comparisons, holm_adjusted([c[key] for c in comparisons])):
            c[f"{key}_holm"] = adjusted
    result = {"command": "compare", **provenance(), "metric": name,
              "label": None if label_id is None else {"id": label_id, "name": label_name},
              "lower_is_better": m.lower_is_better, "unit": m.unit, "kind": kind,
              "base": str(base_path), "base_method": base_report.get("method"), "comparisons": comparisons,
              "definition": asdict(m) | {"confidence": CONFIDENCE}}
    unit = f" [{m.unit}]" if m.unit else ""
    table = Table(title=f"{name_shown} ({'lower' if m.lower_is_better else 'higher'} is better), against {base_path}")
    several = len(comparisons) > 1  # then the Holm-adjusted p-values too
    for header in ("report", "pairs", f"base{unit}", f"this{unit}", f"difference{unit}", "95 % CI", "median",
                   "better / worse / tied", "Wilcoxon p", "sign p", *(("Wilcoxon p (Holm)", "sign p (Holm)") * several)):
        table.add_column(header)
    for c in comparisons:
        ci = "-" if c["ci95"] is None else f"{c['ci95'][0]:+.4f} .. {c['ci95'][1]:+.4f}"
        holm = (f"{c['wilcoxon_p_holm']:.3g}", f"{c['sign_test_p_holm']:.3g}") if several else ()
        table.add_row(escape(c["report"]), str(c["n"]), f"{c['base_mean']:.4f}", f"{c['other_mean']:.4f}",
                      f"{c['mean_difference']:+.4f}", ci, f"{c['median_difference']:+.4f}",
                      f"{c['better']} / {c['worse']} / {c['tied']}", f"{c['wilcoxon_p']:.3g}", f"{c['sign_test_p']:.3g}",
                      *holm)
    print_table(make_console(quiet=quiet), table)
    result = json.loads(json_text(result))  # what the file holds (lists for tuples, plain text), also returned
    if output is not None:
        write_json(output, result)
    return result
