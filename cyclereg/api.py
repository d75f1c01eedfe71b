"""One call per command: the library entry points behind ``cyclereg keypoints``, ``register`` and
``evaluate``, which pick the path from the inputs and refuse options of the other path.

* :func:`keypoints`: one CT volume -> a point file, or a CSV of scan pairs -> a keypoint dataset.
* :func:`register`: two point clouds (keypoint path), two volumes (dense path), or two volumes
  ``via_keypoints`` (Foerstner keypoints, a cloud model, a dense field on the fixed grid).
* :func:`evaluate`: a keypoint dataset (TRE) or a labelled volume dataset (Dice, HD95).

Keyword arguments carry the flags' values (named as in the functions they call, with units:
``sigma_mm`` for ``--sigma``, ``fmt`` for ``--format``). Each checks its inputs before importing torch (a missing file fails in well under a second) and
raises :class:`~cyclereg.errors.InputError` for options that do not go together, naming them as
the command line spells them (the path-specific functions it calls do the same), e.g.
``"--warps is an option for volumes, not point clouds"``. The path-specific functions
(:mod:`cyclereg.clouds.api`, :mod:`cyclereg.dense.api`, :mod:`cyclereg.keypoints.api`) remain the
calls to use when the path is known.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from cyclereg.errors import (MAX_MODEL_SEED, InputError, refuse_empty_paths, refuse_output_in_run,
                             require_checkpoint_file, require_count, require_file, require_seed, require_separate_output,
                             require_switches)

__all__ = ["keypoints", "register", "RegisterResult", "evaluate", "is_volume_file", "refuse_options", "require_inputs",
           "require_switches", "require_run_dir"]


def is_volume_file(path: str | Path) -> bool:
    """Whether ``path`` names a volume (``.nii`` or ``.nii.gz``, any case) rather than a point file."""
    name = Path(path).name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def refuse_options(options: Mapping[str, object], scope: str) -> None:
    """:class:`InputError` if any of ``options`` (flag text -> value; ``None`` = not given, so an
    on/off switch passes ``flag or None``) was given, naming the given ones: "A is an option for
    {scope}", "A and B are options for {scope}"."""
    names = [flag for flag, value in options.items() if value is not None]
    if names:
        listed = f"{', '.join(names[:-1])} and {names[-1]}" if len(names) > 1 else names[0]
        raise InputError(f"{listed} {'are options' if len(names) > 1 else 'is an option'} for {scope}")


def require_inputs(*paths: Path | str | None, folders: bool = False) -> None:
    """:class:`InputError` naming the first given input (``None``: not given) that is not a file;
    ``folders``: an existing folder also passes (run directories). Cheap: no torch import."""
    for p in paths:
        if p is None or (folders and Path(p).is_dir()):
            continue
        require_file(p)


def require_run_dir(path: Path | str | None) -> None:
    """:class:`InputError` naming ``path`` (``None``: not given) unless it is an existing folder."""
    if path is not None and not Path(path).is_dir():
        raise InputError("run directory does not exist" if not Path(path).exists()
                         else "is not a folder (a run directory is)", path)


def refuse_cloud_option_pairs(*, reference: Path | str | None, spacing: object = None,
                              moving_image: Path | str | None = None, moving_labels: Path | str | None = None,
                              spread_map: bool = False, jacobian: bool = False, disp_mm: bool = False) -> None:
    """:class:`InputError` naming the first option of ``register`` on two point files that does not go
    with the others: the outputs on the ``reference`` grid without one, ``--spacing`` with one. Reads
    no file, so that :func:`register` and :func:`cyclereg.clouds.api.register_cloud_files` name such a
    conflict before any file check."""
    for flag, path in (("--moving-image", moving_image), ("--moving-labels", moving_labels)):
        if path is not None and reference is None:
            raise InputError(f"{flag} needs --reference (the grid to warp it onto)", path)
    if spread_map and reference is None:
        raise InputError("--spread-map needs --reference (the grid to write it on)")
    if jacobian and reference is None:
        raise InputError("--jacobian needs --reference (the grid to write it on)")
    if disp_mm and reference is None:
        raise InputError("--disp-mm needs --reference: it sets the unit of the dense field written on that grid "
                         "(displacements.csv is in mm anyway)")
    if spacing is not None and reference is not None:
        raise InputError("--spacing: not used with --reference (headerless voxel-index CSVs are read on the "
                         "reference's grid, the moving one on --moving-image's when given)")


def stage_checkpoint(folder: Path | str, stage: int) -> Path | None:
    """The checkpoint of ``stage`` in a run's fold folder (``RUN/all`` of a volume run, ``RUN/foldK``
    of a keypoint run): ``stage{stage}.pt``, else ``final.pt`` where that records ``stage`` (a run
    whose stage files were removed to save space, as ``carried-runs/abd4``); ``None`` if neither."""
    folder = Path(folder)
    if (folder / f"stage{stage}.pt").is_file():
        return folder / f"stage{stage}.pt"
    return folder / "final.pt" if final_stage(folder) == stage else None


def final_stage(folder: Path | str) -> int | None:
    """The stage that a run's fold folder's ``final.pt`` records; ``None`` where there is none, it is
    unreadable (named where it is loaded as the run's model) or records no stage."""
    final = Path(folder) / "final.pt"
    if not final.is_file():
        return None
    from cyclereg.checkpoint import load_checkpoint

    try:
        return (load_checkpoint(final).get("extra") or {}).get("stage")
    except InputError:
        return None


def keypoints(ct: Path | str | None, output: Path | str, *, pairs: Path | str | None = None,
              mask: Path | str | None = None, lung_mask: bool = False, save_mask: Path | str | None = None,
              sigma_mm: float | None = None, nms_radius_mm: float | None = None,
              moving_nms_radius_mm: float | None = None, threshold: float | None = None,
              max_points: int | None = None, fmt: str | None = None, folds: int | None = None,
              device: str = "auto", verbose: bool = True) -> str | None:
    """Foerstner keypoints of one CT volume ``ct`` into the point file ``output``
    (:func:`cyclereg.keypoints.api.detect_keypoints_file`; prints its own summary when ``verbose``,
    returns None), or, with ``pairs`` (a CSV of scan pairs) instead of ``ct``, the keypoints of every
    listed scan and a keypoint dataset in the folder ``output``
    (:func:`cyclereg.keypoints.api.build_keypoint_dataset`; returns a one-line summary).
    ``mask``, ``save_mask`` and ``fmt`` are for one volume; ``moving_nms_radius_mm`` and ``folds``
    for ``pairs``. Units: mm."""
    refuse_empty_paths({"ct": ct, "output": output, "pairs": pairs, "mask": mask, "save_mask": save_mask},
                       required=("output",), lists=())
    require_switches({"--lung-mask": lung_mask, "verbose": verbose})
    require_inputs(ct, mask, pairs)
    if pairs is None:
        if ct is None:
            raise InputError("give a CT volume, or --pairs PAIRS.csv")
        refuse_options({"--moving-nms-radius": moving_nms_radius_mm, "--folds": folds}, "--pairs")
        from cyclereg.keypoints.api import detect_keypoints_file

        detect_keypoints_file(ct, output, mask=mask, lung_mask=lung_mask, save_mask=save_mask, sigma_mm=sigma_mm,
                              nms_radius_mm=nms_radius_mm, threshold=threshold, max_points=max_points, fmt=fmt,
                              device=device, verbose=verbose)
        return None
    if ct is not None:
        raise InputError(f"give a CT volume or --pairs, not both ({ct} and {pairs})")
    refuse_options({"--mask": mask, "--save-mask": save_mask, "--format": fmt}, "one CT volume, not --pairs")
    from cyclereg.keypoints.api import build_keypoint_dataset, pair_keypoint_config

    config = pair_keypoint_config(sigma_mm=sigma_mm, nms_radius_mm=nms_radius_mm,
                                  moving_nms_radius_mm=moving_nms_radius_mm, threshold=threshold,
                                  max_points=max_points)
    path = build_keypoint_dataset(pairs, output, lung_mask=lung_mask, keypoints=config, folds=folds, device=device,
                                  verbose=verbose)
    return f"wrote {path} (keypoints in {path.parent / 'keypoints'})"


IDENTITY_SCOPE = "a model, not --identity (it registers nothing)"
SEED_SCOPE = "--model random (the seed of the untrained network; a checkpoint's or a run's networks are trained)"


@dataclass(frozen=True)
class RegisterResult:
    """What :func:`register` wrote.

    Attributes:
        out_dir: the output folder.
        files: the output files it wrote there (names; ``config.json`` besides them).
        record: the content of ``out_dir/config.json`` (inputs, resolved configuration, units,
            timings; its layout differs between the dense and the keypoint path).
        summary: the one-line summary the command prints (also ``str(result)``).
    """

    out_dir: Path
    files: tuple[str, ...]
    record: dict[str, Any]
    summary: str

    def __str__(self) -> str:
        return self.summary

    def path(self, name: str) -> Path:
        """The path of output ``name`` (one of :attr:`files`, or ``config.json``)."""
        if name not in self.files and name != "config.json":
            raise KeyError(f"{name}: not an output of this registration (it wrote {', '.join(self.files)})")
        return self.out_dir / name

    @staticmethod
    def read(out_dir: Path | str, summary: str) -> "RegisterResult":
        """The result of a registration that wrote ``out_dir``, from its ``config.json``."""
        from cyclereg.checkpoint import recorded_outputs  # torch is loaded by then (a registration ran)

        record = json.loads((Path(out_dir) / "config.json").read_text())
        return RegisterResult(Path(out_dir), tuple(str(f) for f in recorded_outputs(record)), record, summary)


def register(fixed: Path | str, moving: Path | str, out_dir: Path | str, *, model: str | Path = "random",
             seed: int | None = None,
             device: str = "auto", query: Path | str | None = None, spacing: str | Sequence[float] | None = None,
             reference: Path | str | None = None, moving_image: Path | str | None = None,
             moving_labels: Path | str | None = None, recentre_passes: int | None = None,
             tta_passes: int | None = None, ensemble_fusion: str | None = None, warps: int | None = None,
             adam: bool | None = None, ic: bool | None = None, disp_mm: bool = False, spread: bool = False,
             spread_map: bool = False, l2r_name: bool = False, jacobian: bool = False,
             resample_moving: bool = False, via_keypoints: bool = False, lung_mask: bool = False,
             verbose: bool = True) -> RegisterResult:
    """Register one fixed/moving pair into ``out_dir``; returns a :class:`RegisterResult` (the files
    written, the ``config.json`` record, and the one-line summary as ``str(result)``).

    The inputs pick the path: two point files (csv/npy/ply/pcd, mm) ->
    :func:`cyclereg.clouds.api.register_cloud_files`; two NIfTI volumes -> the dense path
    (:func:`cyclereg.dense.api.register_volume_files`), or with ``via_keypoints`` the keypoint path
    (:func:`cyclereg.clouds.api.register_volumes_via_keypoints`). Options of another path are refused
    by name; see those functions for each option. ``model``: a checkpoint file or ``"random"``;
    ``seed`` (default 0) is the random network's and is refused with a checkpoint. ``verbose=False``:
    no step lines on stderr (with it, a line per step where steps can take minutes: the dense path,
    ``via_keypoints``, and clouds with a ``reference`` grid; clouds alone, seconds, print nothing but
    their errors).
    """
    refuse_empty_paths({"fixed": fixed, "moving": moving, "out_dir": out_dir, "model": model, "query": query,
                        "reference": reference, "moving_image": moving_image, "moving_labels": moving_labels},
                       required=("fixed", "moving", "out_dir"), lists=())
    require_switches({"--adam/--no-adam": adam, "--ic/--no-ic": ic, "--disp-mm": disp_mm, "--spread": spread,
                      "--spread-map": spread_map, "--l2r-name": l2r_name, "--jacobian": jacobian,
                      "--resample-moving": resample_moving, "--via-keypoints": via_keypoints,
                      "--lung-mask": lung_mask, "verbose": verbose})
    model = str(model)
    if model != "random":
        refuse_options({"--seed": seed}, SEED_SCOPE)
    seed = 0 if seed is None else require_seed(seed, largest=MAX_MODEL_SEED)  # the random network's own seed
    if is_volume_file(fixed) != is_volume_file(moving):
        volume, cloud = (fixed, moving) if is_volume_file(fixed) else (moving, fixed)
        raise InputError(f"{cloud}: a point cloud, but {volume} is a volume (NIfTI); register two clouds or two volumes")
    volumes = is_volume_file(fixed)
    # options that do not go together are named before any file is looked at
    if not (via_keypoints and volumes):
        refuse_options({"--lung-mask": lung_mask or None}, "volumes registered --via-keypoints")
    if via_keypoints:
        if not volumes:
            raise InputError(f"--via-keypoints registers two volumes (NIfTI) through their keypoints; {fixed} and "
                             f"{moving} are point clouds already: leave it out")
        refuse_options({"--warps": warps, "--adam/--no-adam": adam, "--ic/--no-ic": ic,
                        "--l2r-name": l2r_name or None, "--resample-moving": resample_moving or None},
                       "the dense path (two volumes without --via-keypoints), not --via-keypoints")
        refuse_options({"--reference": reference, "--moving-image": moving_image, "--spacing": spacing},
                       "point-cloud files, not --via-keypoints (there the fixed scan is the reference grid and the "
                       "moving scan the image to warp)")
    elif volumes:
        refuse_options({"--reference": reference, "--moving-image": moving_image, "--spacing": spacing},
                       "point-cloud files, not volumes")
        refuse_options({"--recentre-passes": recentre_passes, "--tta-passes": tta_passes, "--query": query,
                        "--ensemble-fusion": ensemble_fusion, "--spread": spread or None,
                        "--spread-map": spread_map or None},
                       "point clouds (or volumes with --via-keypoints), not the dense path")
    else:
        refuse_options({"--warps": warps, "--adam/--no-adam": adam, "--ic/--no-ic": ic,
                        "--l2r-name": l2r_name or None, "--resample-moving": resample_moving or None},
                       "volumes, not point clouds")
        refuse_cloud_option_pairs(reference=reference, spacing=spacing, moving_image=moving_image,
                                  moving_labels=moving_labels, spread_map=spread_map, jacobian=jacobian,
                                  disp_mm=disp_mm)
    require_inputs(fixed, moving, query, reference, moving_image, moving_labels)
    refuse_output_in_run(out_dir, "-o")
    if model != "random":
        require_checkpoint_file(model)
    if via_keypoints:
        from cyclereg.clouds.api import register_volumes_via_keypoints

        return RegisterResult.read(out_dir, register_volumes_via_keypoints(
            Path(fixed), Path(moving), Path(out_dir), model=model, seed=seed, lung_mask=lung_mask,
            query=None if query is None else Path(query), device=device, recentre_passes=recentre_passes,
            tta_passes=tta_passes, ensemble_fusion=ensemble_fusion,
            moving_labels=None if moving_labels is None else Path(moving_labels), disp_mm=disp_mm, spread=spread,
            spread_map=spread_map, jacobian=jacobian, verbose=verbose))
    if volumes:
        from cyclereg.dense.api import register_volume_files

        return RegisterResult.read(out_dir, register_volume_files(
            Path(fixed), Path(moving), Path(out_dir), model=model, seed=seed,
            moving_labels=None if moving_labels is None else Path(moving_labels), warps=warps, adam=adam, ic=ic,
            disp_mm=disp_mm, l2r_name=l2r_name, device=device, resample_moving=resample_moving, jacobian=jacobian,
            verbose=verbose))
    from cyclereg.clouds.api import register_cloud_files

    def opt(p):
        return None if p is None else Path(p)

    return RegisterResult.read(out_dir, register_cloud_files(
        Path(fixed), Path(moving), Path(out_dir), model=model, seed=seed, query=opt(query), spacing=spacing,
        device=device, recentre_passes=recentre_passes, tta_passes=tta_passes, ensemble_fusion=ensemble_fusion,
        reference=opt(reference), moving_image=opt(moving_image), moving_labels=opt(moving_labels), disp_mm=disp_mm,
        spread=spread, spread_map=spread_map, jacobian=jacobian, verbose=verbose))


def _listed_inputs(dataset: str | Path) -> dict[str, Path]:
    """The files an ``evaluate`` of ``dataset`` reads, named for a message: every pair's keypoint and
    landmark files, or its scans and label maps (:func:`~cyclereg.errors.require_separate_output`)."""
    from cyclereg.datasets import dataset_kind, load_keypoint_dataset
    from cyclereg.dense.data import load_volume_dataset

    out: dict[str, Path] = {}
    try:
        if dataset_kind(dataset) == "keypoints":
            for p in load_keypoint_dataset(dataset).pairs:
                for what in ("fixed_keypoints", "moving_keypoints", "fixed_landmarks", "moving_landmarks"):
                    out[f"the {what.replace('_', ' ')} of pair {p.id} in the dataset"] = getattr(p, what)
            return out
        for p in load_volume_dataset(dataset).pairs:
            for what in ("fixed", "moving", "fixed_labels", "moving_labels"):
                out[f"the {what.replace('_', ' ')} scan of pair {p.id} in the dataset".replace("labels scan",
                                                                                               "label map")] = (
                    getattr(p, what))
    except InputError:  # a dataset that cannot be read is named by the evaluation itself, after the option checks
        return {}
    return out


KIND_NAMES = {"keypoints": "keypoint", "volumes": "volume"}
"""Dataset kind (:func:`cyclereg.datasets.dataset_kind`, run.json's ``kind``) -> the word messages use."""


def _require_run_of_kind(run: Path, kind: str) -> None:
    """:class:`InputError` naming ``run`` when it was trained on the other kind of dataset than ``kind``
    (its run.json's ``kind``), or is a folder of per-fold keypoint models given for a volume dataset:
    the evaluation's own checks would then report a missing stage or fold, which misleads."""
    try:
        trained_on = json.loads((run / "run.json").read_text(encoding="utf-8-sig")).get("kind")
    except (OSError, ValueError, AttributeError):  # none, or unreadable: the evaluation's reader says so
        trained_on = None
    if trained_on is None and kind == "volumes" and (any(run.glob("fold*.pt")) or any(run.glob("fold*/final.pt"))):
        trained_on = "keypoints"  # an exported model set such as models/copd: per-fold keypoint-cloud models
    if trained_on in KIND_NAMES and trained_on != kind:
        raise InputError(f"a run of a {KIND_NAMES[trained_on]} dataset, and this is a {KIND_NAMES[kind]} dataset: "
                         f"evaluate it with a run trained on {KIND_NAMES[kind]} data", run)


def evaluate(dataset: Path | str, report: Path | str, *, identity: bool = False, model: str | Path | None = None,
             run: Path | str | None = None, stage: int | None = None, seed: int | None = None,
             max_pairs: int | None = None,
             device: str = "auto", recentre_passes: int | None = None, tta_passes: int | None = None,
             ensemble_fusion: str | None = None, errors_csv: Path | str | None = None, spread: bool = False,
             warps: int | None = None, adam: bool | None = None, ic: bool | None = None,
             both_directions: bool = False, resume: bool = False, folds: str | int | None = None) -> dict:
    """Evaluate exactly one of ``identity``, ``model`` (a checkpoint file or ``"random"``) and ``run``
    (a run directory: each pair with the checkpoint of the fold that held it out) on ``dataset``;
    writes the JSON ``report`` and returns it.

    A keypoint dataset is scored by TRE (:func:`cyclereg.clouds.api.evaluate_keypoint_dataset`), a
    labelled volume dataset by Dice and HD95 (:func:`cyclereg.dense.api.evaluate_volume_dataset`),
    both with SDlogJ and run time. Options of the other kind are refused by name. The returned dict is
    the report as written (JSON types; a NaN or infinite figure is ``None``).
    """
    refuse_empty_paths({"dataset": dataset, "report": report, "model": model, "run": run, "errors_csv": errors_csv},
                       required=("dataset", "report"), lists=())
    require_switches({"--identity": identity, "--spread": spread, "--adam/--no-adam": adam, "--ic/--no-ic": ic,
                      "--both-directions": both_directions, "--resume": resume})
    if sum([identity, model is not None, run is not None]) != 1:
        raise InputError("give exactly one of --identity, --model CKPT|random, --run RUN_DIR")
    model = None if model is None else str(model)
    if model != "random":
        refuse_options({"--seed": seed}, SEED_SCOPE)
    seed = 0 if seed is None else require_seed(seed, largest=MAX_MODEL_SEED)  # the random network's own seed
    require_count("--stage", stage, 0)
    require_inputs(dataset)
    checkpoint = None if model in (None, "random") else model
    if checkpoint is not None:
        require_checkpoint_file(checkpoint)
    require_run_dir(run)
    require_separate_output(report, "--json", files={"the dataset": dataset, "the model": checkpoint,
                                                     "the --errors-csv output": errors_csv},
                            run_dirs={"the run directory": run})
    require_separate_output(errors_csv, "--errors-csv", files={"the dataset": dataset, "the model": checkpoint},
                            run_dirs={"the run directory": run})
    from cyclereg.datasets import dataset_kind

    run = None if run is None else Path(run)
    listed = _listed_inputs(dataset)
    require_separate_output(report, "--json", files=listed)
    require_separate_output(errors_csv, "--errors-csv", files=listed)
    if run is not None:
        _require_run_of_kind(run, dataset_kind(dataset))
    if dataset_kind(dataset) == "keypoints":
        refuse_options({"--warps": warps, "--adam/--no-adam": adam, "--ic/--no-ic": ic,
                        "--both-directions": both_directions or None, "--resume": resume or None},
                       "volume datasets, not keypoint datasets")
        if identity:
            refuse_options({"--recentre-passes": recentre_passes, "--tta-passes": tta_passes,
                            "--ensemble-fusion": ensemble_fusion}, IDENTITY_SCOPE)
        folds = None if folds is None else str(folds)
        from cyclereg.clouds.api import evaluate_keypoint_dataset

        evaluate_keypoint_dataset(
            Path(dataset), Path(report), identity=identity, model=model, run=run, stage=stage, seed=seed,
            max_pairs=max_pairs, recentre_passes=recentre_passes, tta_passes=tta_passes,
            ensemble_fusion=ensemble_fusion, device=device, spread=spread,
            errors_csv=None if errors_csv is None else Path(errors_csv), folds=folds)
        return json.loads(Path(report).read_text())
    refuse_options({"--recentre-passes": recentre_passes, "--tta-passes": tta_passes, "--errors-csv": errors_csv,
                    "--ensemble-fusion": ensemble_fusion, "--spread": spread or None, "--folds": folds},
                   "keypoint datasets, not volume datasets")
    if identity:
        refuse_options({"--warps": warps, "--adam/--no-adam": adam, "--ic/--no-ic": ic}, IDENTITY_SCOPE)
    from cyclereg.dense.api import evaluate_volume_dataset

    evaluate_volume_dataset(
        Path(dataset), Path(report), identity=identity, model=model, run=run, stage=stage, seed=seed,
        max_pairs=max_pairs, warps=warps, adam=adam, ic=ic, device=device, both_directions=both_directions,
        resume=resume)
    return json.loads(Path(report).read_text())
