"""scripts/device_check.py: the prepared GPU check (its parts that do not need a GPU)."""

import json
import os
import tarfile
import time
from pathlib import Path

import pytest

from cyclereg.datasets import load_keypoint_dataset
from cyclereg.pointio import read_points

from conftest import load_script
from test_cycle_clouds import _dataset



@pytest.fixture(scope="module")
def dc():
    return load_script("scripts/device_check.py")


def test_prepared_copd_copy_has_the_keypoints_and_no_landmarks(dc, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _dataset(src)
    dst = tmp_path / "dst"
    assert dc.prepare_copd(src, dst) == 3
    meta = json.loads((dst / "dataset.json").read_text())
    assert not any(key in pair for pair in meta["pairs"] for key in dc.LANDMARK_KEYS)
    assert not list(dst.rglob("fl.csv")) and not list(dst.rglob("ml.csv"))
    ds = load_keypoint_dataset(dst / "dataset.json")
    assert [p.id for p in ds.pairs] == ["c0", "c1", "c2"] and len(ds.folds) == 3
    for p in ds.pairs:
        assert p.fixed_landmarks is None and p.moving_landmarks is None
        assert read_points(p.fixed_keypoints).equal(read_points(src / p.id / "fk.csv"))
        assert read_points(p.moving_keypoints).equal(read_points(src / p.id / "mk.csv"))


def test_a_step_past_its_limit_is_killed_with_its_children(dc, tmp_path):
    pid_file = tmp_path / "child.pid"
    t0 = time.monotonic()
    with open(tmp_path / "log", "w") as log:
        rc = dc.run_step(f"sleep 30 & echo $! > {pid_file}; wait", 1, dict(os.environ), log)
    assert rc == "timeout" and time.monotonic() - t0 < 10
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # gone, or a zombie waiting to be reaped
        try:
            state = Path(f"/proc/{child}/stat").read_text().split(")")[-1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail("the step's child process survived its time limit")
    with open(tmp_path / "log", "w") as log:
        assert dc.run_step("exit 3", 10, dict(os.environ), log) == 3


def test_packed_run_keeps_what_resuming_needs(dc, tmp_path):
    run = tmp_path / "myrun"
    (run / "fold1" / "pseudo2.parts").mkdir(parents=True)
    names = ("run.json", "fold1/stage1.pt", "fold1/stage2.partial.pt", "fold1/log.jsonl", "fold1/pseudo2.parts/c0.pt")
    for name in names:
        (run / name).write_text(name)
    assert dc.pack_run(run, tmp_path / "r.tar") == 5
    with tarfile.open(tmp_path / "r.tar") as tar:
        assert sorted(tar.getnames()) == sorted(f"myrun/{n}" for n in names)


def test_the_device_run_starts_from_the_carried_state(dc, tmp_path):
    carried, run = tmp_path / "carried", tmp_path / "runs" / "k256"
    assert not dc.seed_run(carried, run) and not run.exists()  # nothing carried: a fresh run
    (carried / "fold1").mkdir(parents=True)
    (carried / "run.json").write_text("{}")
    (carried / "fold1" / "pseudo0.pt").write_bytes(b"labels")
    assert dc.seed_run(carried, run)
    assert (run / "fold1" / "pseudo0.pt").read_bytes() == b"labels"
    (run / "fold1" / "stage1.pt").write_bytes(b"trained on the device")
    assert not dc.seed_run(carried, run)  # an existing run (a warm machine) is continued, not replaced
    assert (run / "fold1" / "stage1.pt").is_file()


def test_dry_run_lists_the_steps_and_unknown_steps_are_refused(dc, capsys):
    assert dc.main(["run", "--dry-run"]) == 0
    names = [line.split(" ")[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["env", "cuda-tests", "dense-train-step", "dense-pair", "cloud-epoch"]
    assert dc.main(["run", "--dry-run", "--copd-run", "60", "--steps", "copd-k256-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("copd-k256-run (<= 60 s)") and "--candidates 256" in out and out.count("--jobs 5") == 2
    assert dc.main(["run", "--steps", "nope"]) == 2
