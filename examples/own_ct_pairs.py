"""Train on your own CT pairs: from scans to a self-trained keypoint model, end to end.

The workflow of README "Your own keypoint dataset" on real anatomy, checked against known motion:

1. Training pairs: the chest CT (fixed) and copies of it deformed by known smooth random fields
   (seeds 1..N; ``examples/chest_ct_end_to_end.py`` makes them, same convention: fixed -> moving).
   A pairs CSV lists them. No landmark and no known field reaches training.
2. ``cyclereg keypoints --pairs pairs.csv -o OUT/data --lung-mask``: every scan's keypoints and
   ``OUT/data/dataset.json``.
3. ``cyclereg pretrain-random`` + ``cyclereg cycle`` on that dataset (a short schedule by default:
   this is a CPU demonstration, not the paper's 5 x 60 epochs).
4. A held-out pair (another seed's field) registered with ``cyclereg register FIXED MOVING
   -o OUT --via-keypoints --lung-mask`` by the untrained network (with its own single-pass settings, and
   with the trained model's re-centred / test-time-augmented settings) and by the self-trained
   one; the mean error against the known field at the fixed keypoints is printed for each.

Run from the repository root (about 7 minutes on 2 CPU cores with the defaults, 2026-12-05)::

    python examples/own_ct_pairs.py --out runs/own_ct_pairs

Writes the scans, ``OUT/pairs.csv``, ``OUT/data/``, ``OUT/run/``, ``OUT/test_*/`` and
``OUT/own_ct_pairs_result.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chest_ct_end_to_end import DEFAULT_CT, FieldConfig, deform, random_field, u_mm_at  # noqa: E402

from cyclereg.clouds.api import load_cloud_model  # noqa: E402
from cyclereg.device import resolve_device  # noqa: E402
from cyclereg.errors import InputError, refuse_output_in_run, require_count, require_output_dir, require_seed  # noqa: E402
from cyclereg.frames import world_to_voxel  # noqa: E402
from cyclereg.volumeio import read_nifti, write_nifti  # noqa: E402


def cyclereg(*args: object) -> None:
    cmd = [sys.executable, "-m", "cyclereg_cli.main", *map(str, args)]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def make_moving(fixed, cfg: FieldConfig, path: Path):
    """Write the fixed scan deformed by the field of ``cfg`` to ``path``; return that field
    (``u`` on its coarse grid, fine voxels, and the coarse-to-fine factors)."""
    u_c, factor = random_field(fixed.shape, fixed.affine, cfg)
    moving, _ = deform(fixed.data, u_c, factor, cfg.inverse_iterations)
    write_nifti(path, moving, fixed.affine)
    return u_c, factor


def error_at_keypoints(reg_dir: Path, fixed, u_c, factor) -> dict:
    """Mean / median error [mm] of ``reg_dir/displacements.csv`` against the known field at the
    fixed keypoints, and the known motion there."""
    table = np.loadtxt(reg_dir / "displacements.csv", delimiter=",", skiprows=1)
    pts_mm = torch.from_numpy(table[:, :3])
    affine = torch.from_numpy(fixed.affine)
    u_mm = u_mm_at(u_c, factor, world_to_voxel(pts_mm, affine), affine)
    err = np.linalg.norm(table[:, 3:6] - u_mm, axis=1)
    before = np.linalg.norm(u_mm, axis=1)
    return {"points": int(len(err)), "before_mean_mm": float(before.mean()),
            "after_mean_mm": float(err.mean()), "after_median_mm": float(np.median(err))}


def run(ct: Path, out: Path, *, pairs: int, stages: int, epochs: int, test_seed: int, device: str) -> dict:
    fixed = read_nifti(ct)  # read and checked before the output folder is made
    require_output_dir(out)  # a file there, or a run directory's folder: one line before any work
    refuse_output_in_run(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    t = time.perf_counter()
    rows = ["id,fixed,moving"]
    for seed in range(1, pairs + 1):
        make_moving(fixed, FieldConfig(seed=seed), out / f"moving_{seed}.nii.gz")
        rows.append(f"pair{seed},{Path(ct).resolve()},moving_{seed}.nii.gz")
    (out / "pairs.csv").write_text("\n".join(rows) + "\n")
    u_test, factor = make_moving(fixed, FieldConfig(seed=test_seed), out / "test_moving.nii.gz")
    timings["deformations_s"] = time.perf_counter() - t

    t = time.perf_counter()
    cyclereg("keypoints", "--pairs", out / "pairs.csv", "-o", out / "data", "--lung-mask", "--device", device)
    timings["keypoints_s"] = time.perf_counter() - t
    t = time.perf_counter()
    dataset = out / "data" / "dataset.json"
    cyclereg("pretrain-random", dataset, "-o", out / "run", "--stages", stages, "--epochs", epochs, "--device", device)
    cyclereg("cycle", dataset, "--run", out / "run", "--device", device)
    timings["training_s"] = time.perf_counter() - t

    trained = out / "run" / "all" / "final.pt"
    _, stored = load_cloud_model(trained)  # the trained model's test-time settings, for a like-for-like row
    same_settings = ("--recentre-passes", stored.recentre_passes, "--tta-passes", stored.tta_passes)
    results = {}
    for name, model, extra in (("random", "random", ()), ("random_trained_settings", "random", same_settings),
                               ("trained", trained, ())):
        t = time.perf_counter()
        cyclereg("register", ct, out / "test_moving.nii.gz", "-o", out / f"test_{name}", "--via-keypoints",
                 "--lung-mask", "--model", model, "--device", device, *extra)
        timings[f"register_{name}_s"] = time.perf_counter() - t
        results[name] = error_at_keypoints(out / f"test_{name}", fixed, u_test, factor)
    result = {"ct": str(ct), "training_pairs": pairs, "stages": stages, "epochs": epochs, "test_seed": test_seed,
              "held_out_pair": results, "timings_s": {k: round(v, 1) for k, v in timings.items()},
              "torch_threads": torch.get_num_threads()}
    (out / "own_ct_pairs_result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ct", type=Path, default=DEFAULT_CT, help="fixed CT (NIfTI, HU)")
    ap.add_argument("--out", type=Path, default=Path("runs/own_ct_pairs"), help="output folder")
    ap.add_argument("--pairs", type=int, default=4, help="training pairs (deformation seeds 1..N)")
    ap.add_argument("--stages", type=int, default=2, help="self-training stages T")
    ap.add_argument("--epochs", type=int, default=20, help="epochs per stage")
    ap.add_argument("--test-seed", type=int, default=100, help="seed of the held-out pair's field")
    ap.add_argument("--device", default="cpu", help="auto, cpu or cuda (for the cyclereg commands it runs)")
    a = ap.parse_args(argv)
    try:  # options first: a bad value is one line before the CT is deformed
        for flag, value in (("--pairs", a.pairs), ("--stages", a.stages), ("--epochs", a.epochs)):
            require_count(flag, value, 1)
        require_seed(a.test_seed, "--test-seed")
        resolve_device(a.device)
        res = run(a.ct, a.out, pairs=a.pairs, stages=a.stages, epochs=a.epochs, test_seed=a.test_seed,
                  device=a.device)
    except InputError as exc:  # a missing or unreadable CT, an option out of range: one line
        ap.exit(1, f"error: {exc}\n")
    r, rs, tr = (res["held_out_pair"][k] for k in ("random", "random_trained_settings", "trained"))
    print(f"held-out pair, {r['points']} fixed keypoints: known motion {r['before_mean_mm']:.2f} mm; error "
          f"{r['after_mean_mm']:.2f} mm (median {r['after_median_mm']:.2f}) untrained, "
          f"{rs['after_mean_mm']:.2f} mm (median {rs['after_median_mm']:.2f}) untrained with the trained model's "
          f"test-time settings, {tr['after_mean_mm']:.2f} mm (median {tr['after_median_mm']:.2f}) after "
          f"{res['stages']} x {res['epochs']} epochs of self-training on {res['training_pairs']} pairs")


if __name__ == "__main__":
    main()
