"""Messages and records mended in a session (2026-12-07), each one that said or wrote something other than what
happened.

``status --stages T`` of a run trimmed to a ``final.pt`` of fewer stages ('cannot go on') showed a time-left
estimate: none now.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from cyclereg_cli.main import app
from test_cycle_dense import _ToyTask

from cyclereg.training.scheduler import StageScheduler

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_status_of_a_trimmed_run_that_cannot_go_on_estimates_no_time_left(tmp_path):
    """Trimmed to its final.pt (stage 2): towards 2 stages it is finished (0 s left); towards 3 it cannot go on,
    and no time is left to estimate (it said the pace of a stage)."""
    s = StageScheduler(_ToyTask(), tmp_path, keep_labels=2)
    s.run_stage0()
    assert s.run(2) == 2
    for path in [*tmp_path.glob("pseudo*"), *tmp_path.glob("stage*.pt")]:
        path.unlink()
    assert s.status(2)["remaining_s"] == 0.0
    longer = s.status(3)
    assert longer["next"].startswith("cannot go on") and longer["remaining_s"] is None


def test_status_command_of_the_trimmed_abd4_towards_more_stages_shows_no_estimate(tmp_path):
    run = tmp_path / "abd4"
    shutil.copytree(REPO / "carried-runs" / "abd4", run)
    res = runner.invoke(app, ["status", str(run), "--stages", "5", "--json", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    row = json.loads((tmp_path / "s.json").read_text())["folds"][0]
    assert row["next"].startswith("cannot go on") and row["remaining_s"] is None
    assert "0:10:03" not in res.output
