"""Markdown tables of a volume evaluation report (``cyclereg evaluate ... --json R.json`` on a labelled
volume dataset): the summary row and the Dice per organ (mean over the pairs that score the organ,
i.e. where the fixed and the unwarped moving map both have it), as in docs/benchmarks.md.

    python benchmarks/organ_table.py R.json
"""

from __future__ import annotations

import argparse
import json
import statistics


def tables(report: dict) -> str:
    pairs = report["pairs"]
    folds = [100 * p["folding_fraction"] for p in pairs]
    seconds = [p["seconds"] for p in pairs]
    erased = sum(len(p.get("erased_labels", ())) for p in pairs)
    lines = [
        "| pairs | Dice initial | Dice | HD95 initial [mm] | HD95 [mm] | SDlogJ | std logJ | J<=0 | s/pair mean (median) "
        "| labels erased |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {len(pairs)} | {report['initial_dice']:.3f} | **{report['mean_dice']:.3f}** ({report['mean_dice']:.4f}) | "
        f"{report['initial_hd95_mm']:.2f} | {report['mean_hd95_mm']:.2f} | {report['mean_sdlogj']:.3f} | "
        f"{report['mean_std_logj']:.3f} | {statistics.mean(folds):.3f} % (max {max(folds):.3f} %) | "
        f"{statistics.mean(seconds):.0f} ({statistics.median(seconds):.0f}) | {erased} |",
        "",
    ]
    names = report.get("label_names", {})
    labels = sorted({int(k) for p in pairs for k in p["dice_per_label"]})
    lines.append("| organ | " + " | ".join(names.get(str(k), str(k)) for k in labels) + " |")
    lines.append("|---|" + "---|" * len(labels))
    for title, key in (("initial", "initial_dice_per_label"), ("registered", "dice_per_label")):
        cells = []
        for k in labels:
            values = [p[key][str(k)] for p in pairs if str(k) in p[key]]
            cells.append(f"{statistics.mean(values):.2f}" if values else "-")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="volume evaluation report (JSON)")
    report = parser.parse_args().report
    try:
        text = open(report).read()
    except OSError as exc:
        parser.exit(1, f"error: {report}: {exc.strerror}\n")
    try:
        data = json.loads(text)
    except ValueError:
        parser.exit(1, f"error: {report}: not JSON (a volume evaluation report is)\n")
    print(tables(data))


if __name__ == "__main__":
    main()
