"""The prepared GPU check of a session that is lent a device machine (docs/benchmarks.md, "Device check").

A device machine runs one command over a copy of this repository, has no network and none of
``../shared``, and is lent for minutes, so everything it needs is prepared here and the checks
run as one script there:

``python scripts/device_check.py prepare``  (here, with network and ``../shared``)
    writes ``.device/`` (ignored by git): the nibabel wheel (the device image has torch,
    torch-geometric, typer, rich, scikit-image, scipy, but not nibabel) and the COPD keypoint
    clouds *without their landmark files* (the device trains and times; landmark evaluation
    stays on this machine). Prints the ``run`` call to make.

``python3 scripts/device_check.py run [--steps NAME ...] [--budget S] [--copd-run SECONDS] [--dry-run]``
(on the device, in the repo root) writes ``$OUT/device_check.log`` (every step's output) and ``$OUT/device_check.json`` (each
    step's command, exit status and seconds), each step under its own time limit, going on after
    a failed step, all steps together within ``--budget`` seconds:

    1. ``env``: nvidia-smi, python, torch and CUDA versions;
    2. ``cuda-tests``: the default test suite's tests parametrised on the ``cuda`` device;
    3. ``dense-train-step``: seconds per training iteration and peak memory at the abdomen size
       (reference implementation on an H100: 0.12 s at batch 2, 3.2 GB);
    4. ``dense-pair``: seconds per test pair with and without Adam (reference: 0.10 / 0.31 s);
    5. ``cloud-epoch``: COPD epoch and pseudo-label refresh at K = 64 and the authors' 256;
    6. with ``--copd-run S``: ``pretrain-random`` + ``cycle`` of all five COPD folds at K = 256
       on all keypoints (``--jobs 5``) for at most S seconds, then the run directory (with its
       mid-stage snapshots and partial labels, so that nothing finished is lost) packed into
       ``$OUT/copd_k256_run.tar``. The run starts from the state committed in
       ``carried-runs/copd_k256`` (the same run, trained so far on CPUs) when there is one.
       ``cycle`` resumes, so on a machine that is still warm the same call continues it.
       Evaluate the unpacked run here with
       ``cyclereg evaluate ../shared/data/copd-keypoints/dataset.json --run RUN``.

Nothing here reads a landmark.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREPARED = ROOT / ".device"
SHARED_COPD = ROOT.parent / "shared" / "data" / "copd-keypoints"
LANDMARK_KEYS = ("fixed_landmarks", "moving_landmarks")
COPD_RUN = ROOT / "runs" / "device_copd_k256"
CARRIED_RUN = ROOT / "carried-runs" / "copd_k256"
"""The K = 256 run as far as earlier sessions took it (committed, since no machine keeps files)."""
MIN_STEP_S = 20
"""A step is skipped when less of the ``--budget`` is left."""
RUN_CALLS = ('run(command="python3 scripts/device_check.py run --budget 300", carry=[".device"], timeout_s=360)',
             'run(command="python3 scripts/device_check.py run --steps copd-k256-run --copd-run 420 --budget 450", '
             'carry=[".device"], timeout_s=500)')


# ----------------------------------------------------------------------------- here
class PrepareError(Exception):
    """A bad ``--copd`` folder: the message names the file and the problem (one line)."""


def prepare_copd(src: Path, dst: Path) -> int:
    """Copy the keypoint clouds of the dataset ``src`` (a folder with ``dataset.json``) to ``dst``
    with a ``dataset.json`` that names no landmark file; returns the number of pairs. The copy is made
    beside ``dst`` and replaces it only when complete: a bad ``src`` (:class:`PrepareError`) leaves an
    earlier ``dst`` as it was."""
    index = src / "dataset.json"
    try:
        meta = json.loads(index.read_text())
        pairs = meta["pairs"]
        files = [pair[key] for pair in pairs for key in ("fixed_keypoints", "moving_keypoints")]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PrepareError(f"{index}: not a readable keypoint dataset ({type(exc).__name__})") from None
    missing = [str(src / f) for f in files if not (src / f).is_file()]
    if missing:
        raise PrepareError(f"{index} names keypoint files that do not exist: {', '.join(missing)}")
    staging = dst.with_name(dst.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for pair in pairs:
        for key in LANDMARK_KEYS:
            pair.pop(key, None)
        for key in ("fixed_keypoints", "moving_keypoints"):
            (staging / pair[key]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / pair[key], staging / pair[key])
    (staging / "dataset.json").write_text(json.dumps(meta, indent=1))
    if dst.exists():
        shutil.rmtree(dst)
    staging.rename(dst)
    return len(pairs)


def prepare(args) -> int:
    PREPARED.mkdir(exist_ok=True)
    try:
        n = prepare_copd(Path(args.copd), PREPARED / "copd-keypoints")
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{n} COPD keypoint pairs (no landmarks) -> {PREPARED / 'copd-keypoints'}")
    wheels = PREPARED / "wheels"
    if args.no_wheels:
        print("wheels skipped (--no-wheels)")
    else:
        wheels.mkdir(exist_ok=True)
        rc = subprocess.call([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(wheels),
                              "nibabel>=5"])
        if rc:
            print("error: pip download nibabel failed (no network?); volumes steps would fail on the device",
                  file=sys.stderr)
            return rc
        print(f"wheels -> {wheels}: {', '.join(sorted(p.name for p in wheels.glob('*.whl')))}")
    print("then, with a device lent (15 min of device time in all; the second call continues a warm machine's run):")
    for call in RUN_CALLS:
        print(f"  {call}")
    return 0


# ----------------------------------------------------------------------------- on the device
def steps(copd_run: int | None, device: str = "cuda") -> list[tuple[str, list[str] | str, int]]:
    """``(name, command, time limit in seconds)`` of each step on ``device``; a string runs in a shell."""
    py = sys.executable
    copd = str(PREPARED / "copd-keypoints" / "dataset.json")
    cli = [py, "-m", "cyclereg_cli.main"]
    out = [("env", "nvidia-smi; " + f"{py} -c \"import sys, torch; print(sys.version); print('torch', torch.__version__, "
            "'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), "
            "torch.cuda.get_device_name() if torch.cuda.is_available() else '')\"", 60),
           ("cuda-tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda", "tests"], 240),
           ("dense-train-step", [py, "benchmarks/dense_train_step.py", "192", "160", "256", "--iterations", "20",
                                 "--device", device], 150),
           ("dense-pair", [py, "benchmarks/dense_pair_time.py", "192", "160", "256", "--repeats", "5",
                           "--device", device], 150),
           ("cloud-epoch", [py, "benchmarks/cloud_epoch_time.py", copd, "--points", "all", "--candidates", "64", "256",
                            "--device", device, "--threads", "4"], 240)]
    if copd_run:
        run = str(COPD_RUN)
        out.append(("copd-k256-run", " && ".join([
            " ".join(cli + ["pretrain-random", copd, "-o", run, "--fold", "all", "--candidates", "256",
                            "--jobs", "5", "--device", device]) + f" || test -f {run}/run.json",
            " ".join(cli + ["cycle", copd, "--run", run, "--folds", "all", "--jobs", "5", "--device", device])]),
            copd_run))
    return out


def seed_run(carried: Path, run: Path) -> bool:
    """Copy ``carried`` to ``run`` when ``run`` does not exist yet; returns whether it did."""
    if run.exists() or not (carried / "run.json").is_file():
        return False
    tmp = run.with_name(run.name + ".seeding")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(carried, tmp)
    os.replace(tmp, run)
    return True


def pack_run(run: Path, tar_path: Path) -> int:
    """Pack ``run`` into ``tar_path`` (everything, mid-stage snapshots and partial labels
    included: for the graph CNN they are small); returns the files packed."""
    files = [p for p in sorted(run.rglob("*")) if p.is_file()]
    tmp = tar_path.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tar:
        for p in files:
            tar.add(p, arcname=str(Path(run.name) / p.relative_to(run)))
    os.replace(tmp, tar_path)
    return len(files)


def run_step(cmd: list[str] | str, limit: int, env: dict, log) -> int | str:
    """Run one step in its own process group; past ``limit`` seconds the whole group (worker
    processes included) is killed and ``"timeout"`` returned, else the exit status."""
    proc = subprocess.Popen(cmd, shell=isinstance(cmd, str), cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "timeout"


def ensure_nibabel(log) -> None:
    if importlib.util.find_spec("nibabel") is None:
        wheels = sorted((PREPARED / "wheels").glob("nibabel-*.whl"))
        if not wheels:
            log.write("nibabel missing and no wheel in .device/wheels (run `prepare` first); volume steps may fail\n")
            return
        log.flush()
        subprocess.call([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                         str(wheels[-1])], stdout=log, stderr=subprocess.STDOUT)


def run(args) -> int:
    for flag, value in (("--budget", args.budget), ("--copd-run", args.copd_run)):  # seconds: 0 or less runs nothing
        if value is not None and value < 1:
            print(f"error: {flag} {value}: need 1 second or more", file=sys.stderr)
            return 2
    out = Path(args.out or os.environ.get("OUT") or ROOT / "out" / "device_check")
    plan = steps(args.copd_run, args.device)
    if args.steps:
        unknown = set(args.steps) - {name for name, _, _ in plan}
        if unknown:
            print(f"error: --steps: unknown {sorted(unknown)}; known: {[name for name, _, _ in plan]}", file=sys.stderr)
            return 2
        plan = [step for step in plan if step[0] in args.steps]
    if args.dry_run:
        for name, cmd, limit in plan:
            print(f"{name} (<= {limit} s): {cmd if isinstance(cmd, str) else ' '.join(cmd)}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1")
    report = []
    if args.copd_run and seed_run(CARRIED_RUN, COPD_RUN):
        print(f"{COPD_RUN} starts from {CARRIED_RUN}", flush=True)
    end = time.monotonic() + args.budget
    with open(out / "device_check.log", "a") as log:
        ensure_nibabel(log)
        for name, cmd, limit in plan:
            limit = min(limit, int(end - time.monotonic()))
            if limit < MIN_STEP_S:
                report.append({"step": name, "returncode": "skipped: budget spent", "seconds": 0})
                print(f"{name}: skipped, budget spent", flush=True)
                continue
            log.write(f"\n===== {name} (limit {limit} s) =====\n")
            log.flush()
            t0 = time.perf_counter()
            rc = run_step(cmd, limit, env, log)
            report.append({"step": name, "command": cmd if isinstance(cmd, str) else " ".join(cmd),
                           "returncode": rc, "seconds": round(time.perf_counter() - t0, 1)})
            log.write(f"----- {name}: {rc} after {report[-1]['seconds']} s\n")
            log.flush()
            (out / "device_check.json").write_text(json.dumps(report, indent=1))
            print(f"{name}: {rc} after {report[-1]['seconds']} s", flush=True)
    if args.copd_run and COPD_RUN.exists():
        n = pack_run(COPD_RUN, out / "copd_k256_run.tar")
        print(f"packed {n} files of {COPD_RUN} -> {out / 'copd_k256_run.tar'}")
    return 0 if all(r["returncode"] == 0 for r in report) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("prepare", help="here: write .device/ (wheels, COPD keypoints without landmarks)")
    p.add_argument("--copd", default=str(SHARED_COPD), help="the copd-keypoints folder")
    p.add_argument("--no-wheels", action="store_true", help="skip downloading the nibabel wheel")
    r = sub.add_parser("run", help="on the device machine: the checks, logs to $OUT")
    r.add_argument("--out", default=None, help="default: $OUT")
    r.add_argument("--copd-run", type=int, default=None, metavar="SECONDS",
                   help="also train all COPD folds at K = 256 for at most SECONDS (resumes)")
    r.add_argument("--steps", nargs="+", default=None, help="only these steps (names as --dry-run prints)")
    r.add_argument("--budget", type=int, default=540,
                   help="seconds for all steps together; a step gets at most what is left (default 540)")
    r.add_argument("--device", default="cuda", help="device of the timed steps (cpu: a slow local smoke run)")
    r.add_argument("--dry-run", action="store_true", help="print the steps and stop")
    args = ap.parse_args(argv)
    return prepare(args) if args.verb == "prepare" else run(args)


if __name__ == "__main__":
    raise SystemExit(main())
