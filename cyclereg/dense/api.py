"""File-level entry points of the dense path, called by the ``cyclereg`` CLI.

Outputs of :func:`register_volume_files` (in ``out_dir``):

``displacement.nii.gz``
    ``(D, H, W, 3)`` float32 with the fixed image's affine; fixed -> moving: the fixed
    voxel ``x`` corresponds to the moving voxel ``x + u(x)``. By default the 3 components
    are **voxels of the fixed grid along the array axes (i, j, k)** (the package
    convention, also Learn2Reg's); with ``disp_mm=True`` they are **world millimetres
    (x, y, z) of the NIfTI affine** (``u_mm = A[:3, :3] @ u_vox``). The header says which: its
    intent name ``disp voxel ijk`` or ``disp mm xyz`` (and its ``descrip``).
``warped.nii.gz``
    the moving image (original intensities) resampled into the fixed grid (trilinear).
``warped_labels.nii.gz``
    with ``moving_labels``: the label map warped with nearest-neighbour sampling.
``jacobian.nii.gz``
    with ``jacobian=True``: the determinant of the Jacobian of ``x -> x + u(x)`` per fixed
    voxel (float32, :func:`cyclereg.metrics.jacobian_map`).
``disp_FFFF_MMMM.nii.gz``
    with ``l2r_name=True``: the same field in voxels under the Learn2Reg file name.
``config.json``
    the resolved pipeline configuration, model, inputs and output conventions.
"""

from __future__ import annotations

import json

import time
from pathlib import Path

import numpy as np
import torch

from cyclereg.checkpoint import (data_fingerprint, file_sha256, load_checkpoint, refuse_replacing_inputs,
                                 stale_outputs, save_checkpoint, staged_file_set, staged_outputs, to_jsonable,
                                 training_data, write_json)
from cyclereg.console import Steps, count, make_console, print_note, print_table
from cyclereg.datasets import JSON_READ_ERRORS
from cyclereg.dense.config import DensePipelineConfig, config_from_dict
from cyclereg.dense.data import (case_id, check_pair_grids, check_same_grid, load_volume_dataset, overlap_fraction,
                                 preprocess, require_contrast, resample_onto, resolve_mode)
from cyclereg.dense.network import FeatureNet, random_feature_net
from cyclereg.dense.pipeline import min_volume_size, register
from cyclereg.device import provenance, resolve_device
from cyclereg.errors import (InputError, require_count, require_file, require_finite_result, require_output_dir,
                             require_output_file, whole_number)
from cyclereg.metrics import (SDLOGJ_MIN_SIZE, determinant_stats, dice, erased_labels, hd95, jacobian_map,
                              scored_labels, sdlogj)
from cyclereg.volumeio import (Volume, axis_codes, read_nifti, same_grid, spacing_differs, spacing_text,
                               write_displacement, write_nifti)
from cyclereg.warp import warp, warp_between_grids, warp_labels

CHECKPOINT_KIND = "dense"

EVALUATE_CACHED_VOLUMES = 8
"""``evaluate`` keeps this many read volumes (images and label maps) for the next pairs, the least
recently used going first (pairs share scans; a 192x160x256 float32 scan is 31 MB)."""
LOW_OVERLAP_NOTE = 0.5
"""``register --resample-moving`` notes on stderr when fewer than this share of the fixed scan's voxels lie
inside the moving scan (a header placing the scans in different world frames is the usual cause)."""


# ----------------------------------------------------------------------------- models
def load_model(model: str | Path, seed: int = 0, device: str | torch.device = "cpu"
               ) -> tuple[FeatureNet, DensePipelineConfig, dict]:
    """``"random"`` -> a seeded random network with the default config; otherwise a
    checkpoint written by :func:`save_model`. Returns ``(net in eval mode, config, info)``."""
    dev = resolve_device(device)
    if str(model) == "random":
        cfg = DensePipelineConfig().validate()
        with torch.random.fork_rng(devices=[]):  # seeded from its own generator: leave the caller's RNG be
            net = random_feature_net(cfg.net, seed)
        info = {"model": "random", "seed": int(seed)}
    else:
        payload = load_checkpoint(model, kind=CHECKPOINT_KIND)
        try:
            cfg = config_from_dict(payload["config"])
            with torch.random.fork_rng(devices=[]):  # the initial values are replaced by the checkpoint's
                net = FeatureNet(cfg.net)
            net.load_state_dict(payload["state_dict"])
        except (TypeError, ValueError, KeyError, RuntimeError, AttributeError) as exc:
            raise InputError(f"checkpoint does not match the dense model ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]})", model) from None
        net.eval()
        info = {"model": str(model), "version": payload.get("version"), "extra": payload.get("extra", {})}
    return net.to(dev), cfg, info


def save_model(path: str | Path, net: FeatureNet, cfg: DensePipelineConfig, extra: dict | None = None) -> None:
    """Checkpoint ``{config, state_dict, version, kind="dense"}`` (atomic)."""
    save_checkpoint(path, kind=CHECKPOINT_KIND, config=cfg, state_dict=net.state_dict(), extra=extra)


def _pipeline_config(cfg: DensePipelineConfig, warps, adam, ic) -> DensePipelineConfig:
    if warps is not None and (not whole_number(warps) or warps not in (1, 2)):  # 2.0 and True are no counts
        raise InputError(f"--warps must be 1 or 2, got {warps!r}")
    return cfg.replace(warps=warps, use_adam=adam, use_ic=ic).validate()


def _check_spacing(cfg: DensePipelineConfig, vol: Volume) -> None:
    if cfg.spacing_mm is None:
        return
    exp = np.asarray(cfg.spacing_mm, dtype=float)
    got = np.asarray(vol.spacing, dtype=float)
    if spacing_differs(got, exp, cfg.spacing_tolerance):
        raise InputError(f"voxel spacing {spacing_text(got)} mm differs from the model's "
                         f"{spacing_text(exp)} mm; resample the volume to the model's spacing first", vol.path)


def _check_orientation(cfg: DensePipelineConfig, vol: Volume) -> None:
    if cfg.orientation is None:
        return
    got = axis_codes(vol.affine)
    if got != tuple(cfg.orientation):
        raise InputError(f"its voxel axes point {''.join(got)} (nibabel axis codes) but the model learnt on volumes "
                         f"stored {''.join(cfg.orientation)}: its features are of the voxel arrays, which a flip or "
                         f"an axis swap changes; reorient the volume to {''.join(cfg.orientation)} first", vol.path)


def require_volume_size(cfg: DensePipelineConfig, vol: Volume) -> None:
    """:class:`InputError` naming ``vol``'s file when it has fewer than :func:`min_volume_size` voxels along
    an axis (registration, evaluation and the stage-0 labels of training alike)."""
    need = min_volume_size(cfg)
    if min(vol.shape) < need:
        raise InputError(f"volume of shape {tuple(vol.shape)} is too small to register: every axis needs at least "
                         f"{need} voxels (the feature network downsamples by {cfg.net.downsampling})", vol.path)


def _prepare(vol: Volume, cfg: DensePipelineConfig, mode: str, dev) -> torch.Tensor:
    return preprocess(vol.data, cfg.preprocess, mode).to(dev)[None, None]


def require_registrable_grid(fixed: Volume, cfg: DensePipelineConfig) -> None:
    """:class:`InputError` naming the file when ``cfg`` cannot register on ``fixed``'s grid (the
    moving scan's being the same): the spacing or the axes' orientation is not the model's, or the volume
    is too small. Reads the grid only (shape, affine), not the voxels."""
    _check_spacing(cfg, fixed)
    _check_orientation(cfg, fixed)
    require_volume_size(cfg, fixed)


def require_registrable(fixed: Volume, moving: Volume, cfg: DensePipelineConfig) -> None:
    """:class:`InputError` naming the file when ``cfg`` cannot register the pair: grids differ, the
    spacing is not the model's, a volume is too small or constant."""
    check_same_grid(fixed, moving)
    require_registrable_grid(fixed, cfg)
    require_contrast(fixed)
    require_contrast(moving)


def register_pair(fixed: Volume, moving: Volume, net: FeatureNet, cfg: DensePipelineConfig,
                  *, modality: str | None = None) -> torch.Tensor:
    """Register two volumes on one grid; returns ``(1, 3, D, H, W)`` voxels, fixed -> moving."""
    require_registrable(fixed, moving, cfg)
    dev = next(net.parameters()).device
    mode = resolve_mode(fixed.data, cfg.preprocess, modality)
    return register(_prepare(fixed, cfg, mode, dev), _prepare(moving, cfg, mode, dev), net, cfg)


# ----------------------------------------------------------------------------- register
def register_volume_files(fixed: Path, moving: Path, out_dir: Path, *, model: str = "random", seed: int = 0,
                          moving_labels: Path | None = None, warps: int | None = None,
                          adam: bool | None = None, ic: bool | None = None, disp_mm: bool = False,
                          l2r_name: bool = False, device: str = "auto", resample_moving: bool = False,
                          jacobian: bool = False, verbose: bool = False) -> str:
    """Register ``moving`` to ``fixed`` (NIfTI files) and write the outputs listed in the
    module docstring. All inputs are validated before ``out_dir`` is created. ``verbose``: a line per
    step on stderr (:class:`~cyclereg.console.Steps`; a large pair takes minutes).

    The two scans must share one grid (shape and affine), unless ``resample_moving``: then a
    moving scan on another grid (shape, spacing, origin or orientation) is first resampled
    onto the fixed grid through world millimetres (:func:`~cyclereg.dense.data.resample_onto`;
    its label map likewise, nearest neighbour), and every output lies on the fixed grid as
    usual: ``x + u(x)`` is then a position in the fixed grid's voxels whose world point
    (fixed affine) is the corresponding moving point. The warped scan and labels are sampled
    at those world points from the files as given (one interpolation, not two).
    """
    dev = resolve_device(device)
    steps = Steps(verbose)
    with steps("read scans"):
        fv = read_nifti(fixed)
        mv = read_nifti(moving)
        lv = None
        if moving_labels is not None:
            lv = read_nifti(moving_labels, labels=True)
            check_same_grid(mv, lv, what="label map", ref="moving image")
    resampled = resample_moving and not same_grid(fv, mv)
    given_mv, given_lv = mv, lv  # as read: the outputs are sampled from these, with one interpolation
    overlap = None
    if resampled:
        overlap = overlap_fraction(mv, fv)
        if overlap == 0:
            raise InputError("no voxel of the fixed scan lies inside it (--resample-moving): it does not overlap the "
                             f"fixed scan {fixed} in world space (check the two affines)", moving)
        if overlap < LOW_OVERLAP_NOTE:
            print_note(f"only {overlap:.0%} of the fixed scan's voxels lie inside the moving scan {moving} "
                       "(--resample-moving; the rest see its edge): check that the two affines share a world frame")
        mv = resample_onto(mv, fv)
        lv = None if lv is None else resample_onto(lv, fv, labels=True)
    check_same_grid(fv, mv, hint="resample it onto the fixed grid first (register --resample-moving does so)")
    require_output_dir(out_dir)
    fields = {"displacement.nii.gz": "mm" if disp_mm else "voxel"}
    if l2r_name:
        fields[f"disp_{case_id(Path(fixed))}_{case_id(Path(moving))}.nii.gz"] = "voxel"
    volume_names = ["warped.nii.gz", *(["warped_labels.nii.gz"] if lv is not None else []),
                    *(["jacobian.nii.gz"] if jacobian else [])]
    written = [*fields][:1] + volume_names + [*fields][1:]
    inputs = [Path(v) for v in (fixed, moving, moving_labels, None if model == "random" else model) if v]
    refuse_replacing_inputs([*written, "config.json"], out_dir, inputs)  # before the registration's minutes
    net, cfg, info = load_model(model, seed, dev)
    cfg = _pipeline_config(cfg, warps, adam, ic)

    t0 = time.perf_counter()
    with steps(f"dense registration, {'x'.join(map(str, fv.shape))} voxels ({dev})"):
        disp = register_pair(fv, mv, net, cfg)
    seconds = time.perf_counter() - t0
    require_finite_result(disp, "the displacements", fixed)

    # every output is computed before any is written; they reach out_dir together (staged_outputs)
    out_dir = Path(out_dir)
    with steps("warped scan" + (", labels" if lv is not None else "") + ", Jacobian"):
        disp_cpu = disp.detach().cpu().float()
        if resampled:  # straight from the scan's own grid, not from its copy on the fixed grid
            warped = warp_between_grids(given_mv.data[None, None].float(), given_mv.affine, disp_cpu, fv.affine)[0, 0]
        else:
            warped = warp(mv.data[None, None].float(), disp_cpu)[0, 0]
        volumes = {"warped.nii.gz": warped}
        if lv is not None:
            volumes["warped_labels.nii.gz"] = (
                warp_labels(given_lv.data[None, None], disp_cpu, labels_affine=given_lv.affine, fixed_affine=fv.affine)
                if resampled else warp_labels(lv.data[None, None], disp_cpu))[0, 0]
        jac = jacobian_map(disp_cpu)
        if jacobian:
            volumes["jacobian.nii.gz"] = jac
        stats = determinant_stats(jac[None, 1:-1, 1:-1, 1:-1])  # = sdlogj(disp_cpu), from the map computed once
    record = {
        **provenance(dev),
        "command": "register",
        "config": cfg,
        "model": info,
        "device": str(dev),
        "inputs": {"fixed": str(fixed), "moving": str(moving),
                   "moving_labels": str(moving_labels) if moving_labels else None,
                   "moving_resampled_onto_fixed_grid": resampled,
                   "fixed_voxels_inside_moving": overlap},
        "outputs": {
            "files": written,
            "displacement": {
                "direction": "fixed -> moving: fixed voxel x maps to moving position x + u(x)",
                "units": "mm" if disp_mm else "voxel",
                "components": ("world x, y, z (NIfTI affine)" if disp_mm
                               else "fixed-grid array axes i, j, k (nibabel order)"),
                "layout": "(D, H, W, 3), affine of the fixed image",
            },
        },
        "seconds": seconds,
        "sdlogj": stats["sdlogj"],
        "folding_fraction": stats["folding_fraction"],
    }
    with steps("write"), staged_outputs(out_dir) as stage:
        for name, unit in fields.items():
            write_displacement(stage / name, disp_cpu, fv.affine, unit=unit)
        for name, data in volumes.items():
            write_nifti(stage / name, data, fv.affine)
        write_json(stage / "config.json", record)
        # what an earlier register wrote into this folder and this one does not (never the inputs)
        stage.inputs = inputs
        stage.find_stale = lambda: stale_outputs(out_dir, written, keep=tuple(stage.inputs))
    return (f"registered in {seconds:.1f} s; SDlogJ {stats['sdlogj']:.3f}, "
            f"folding {100 * stats['folding_fraction']:.3f} %; wrote {', '.join(written)} to {out_dir}")


# ----------------------------------------------------------------------------- evaluate
def pair_scores(fixed_labels: torch.Tensor, moving_labels: torch.Tensor, warped_labels: torch.Tensor,
                disp: torch.Tensor, spacing) -> dict:
    """Scores of one registered pair (shared by ``evaluate`` and the peer benchmarks).

    Args:
        fixed_labels, moving_labels, warped_labels: integer maps ``(D, H, W)`` on the fixed grid.
        disp: ``(1, 3, D, H, W)`` field in fixed-grid voxels, fixed -> moving.
        spacing: voxel size (i, j, k) in mm, or the fixed grid's (3, 3) voxel -> mm map, for HD95
            (:func:`~cyclereg.metrics.hd95`).
    Returns:
        mean and per-label Dice (before/after), HD95 [mm], Learn2Reg SDlogJ, std(log J)
        and the folding fraction (J <= 0); ``erased_labels``: the scored labels the warp removed
        (Dice 0; HD95, which has no surface to measure for them, leaves them out).
    """
    labels = scored_labels(fixed_labels, moving_labels)
    d0 = dice(fixed_labels, moving_labels, labels)
    d1 = dice(fixed_labels, warped_labels, labels)
    h = hd95(fixed_labels, warped_labels, spacing=spacing, labels=labels)
    h0 = hd95(fixed_labels, moving_labels, spacing=spacing, labels=labels)
    s = sdlogj(disp)
    return {
        "initial_dice": _mean(d0.values()), "dice": _mean(d1.values()),
        "hd95_mm": _mean(h.values()), "initial_hd95_mm": _mean(h0.values()),
        "sdlogj": s["sdlogj"], "std_logj": s["std_logj"], "folding_fraction": s["folding_fraction"],
        "dice_per_label": {str(k): v for k, v in d1.items()},
        "initial_dice_per_label": {str(k): v for k, v in d0.items()},
        "hd95_per_label_mm": {str(k): v for k, v in h.items()},
        "erased_labels": erased_labels(warped_labels, labels),
    }


def pairs_of_training_images(pairs: list, record: dict | None) -> list[str]:
    """Ids of those ``pairs`` whose fixed and moving scans are both among the training images a model's
    ``record`` names (by :func:`~cyclereg.checkpoint.data_fingerprint` of the files, whatever the
    dataset and the cases are called): the model may have trained on them (in either direction)."""
    if not record or not isinstance(record.get("images"), dict):
        return []
    seen = set(record["images"].values())
    known: dict[Path, bool] = {}

    def trained(path: Path) -> bool:
        if path not in known:
            known[path] = data_fingerprint(path) in seen
        return known[path]

    return [p.id for p in pairs if trained(p.fixed) and trained(p.moving)]


PAIR_MEANS = (("mean_dice", "dice"), ("initial_dice", "initial_dice"), ("mean_hd95_mm", "hd95_mm"),
              ("initial_hd95_mm", "initial_hd95_mm"), ("mean_sdlogj", "sdlogj"), ("mean_std_logj", "std_logj"),
              ("mean_folding_fraction", "folding_fraction"), ("mean_seconds", "seconds"))
"""The report's figures that are means over every pair record: (report key, pair-record key)."""

PAIR_RECORD_KEYS = frozenset({"id", *(field for _, field in PAIR_MEANS)})
"""The fields of a pair record that :func:`summarize_pairs` and the report's table read (a resumed
report's records must hold them)."""


def summarize_pairs(records: list[dict]) -> dict:
    """Top-level report figures: means over the pair records of :func:`pair_scores`."""
    return {
        "num_pairs": len(records),
        **{key: _mean(r[field] for r in records) for key, field in PAIR_MEANS},
        # scoring time per pair (records written before this field: left out of the mean)
        "mean_scoring_seconds": (_mean(r["scoring_seconds"] for r in records if "scoring_seconds" in r)
                                 if any("scoring_seconds" in r for r in records) else None),
        # labels scored with Dice 0 and left out of HD95 (records written before this field: not counted)
        "erased_labels": sum(len(r.get("erased_labels", ())) for r in records),
    }


def run_checkpoint(run: Path, stage: int | None = None) -> Path:
    """The checkpoint of a volume self-training run: ``RUN/all/final.pt`` or, for one stage, its
    checkpoint (:func:`cyclereg.api.stage_checkpoint`: ``stage{t}.pt``, else ``final.pt`` if it is stage ``t``'s)."""
    from cyclereg.api import stage_checkpoint  # noqa: PLC0415 - cyclereg.api imports this module's callers

    run = Path(run)
    if not (run / "run.json").is_file():
        raise InputError("not a cyclereg run directory (run.json missing)", run)
    path = run / "all" / "final.pt" if stage is None else stage_checkpoint(run / "all", stage)
    if path is None or not path.is_file():
        if stage == 0:  # its labels come from a random network, which is no file
            from cyclereg.datasets import read_json
            from cyclereg.training.scheduler import initial_network_seed

            seed = initial_network_seed(read_json(run / "run.json").get("config", {}).get("seed", 0), 0)
            raise InputError(f"stage 0 has no checkpoint: its pseudo labels come from a random network, the one "
                             f"'--model random --seed {seed}' evaluates", run)
        what = "no finished stage yet (run 'cyclereg cycle')" if stage is None else f"no checkpoint of stage {stage}"
        raise InputError(what, run)
    return path


class VolumeCache:
    """The ``capacity`` volumes used last (images and label maps, read by :func:`read_nifti`), so
    that the scans pairs share are read once: least recently used out first, which keeps the fixed
    scan of a run of pairs ``(i, j), (i, j + 1), ...`` while their moving scans come and go."""

    def __init__(self, capacity: int):
        self.capacity = require_count("capacity", capacity, 1)
        self._volumes: dict[tuple[Path, bool], Volume] = {}

    def get(self, path: Path, *, labels: bool) -> Volume:
        key = (Path(path), labels)
        vol = self._volumes.pop(key, None)
        if vol is None:
            vol = read_nifti(path, labels=labels)
            if len(self._volumes) >= self.capacity:
                self._volumes.pop(next(iter(self._volumes)))  # the least recently used
        self._volumes[key] = vol  # (re)inserted last: the most recently used
        return vol


def _mean(values) -> float:
    vals = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def evaluate_volume_dataset(dataset: Path, report: Path, *, identity: bool = False, model: str | None = None,
                            run: Path | None = None, stage: int | None = None, seed: int = 0,
                            max_pairs: int | None = None,
                            warps: int | None = None, adam: bool | None = None, ic: bool | None = None,
                            device: str = "auto", both_directions: bool = False, figures: bool = True,
                            console=None, resume: bool = False) -> dict:
    """Evaluate the ``registration_val`` pairs of a labelled Learn2Reg dataset.

    Writes ``report`` (JSON: ``mean_dice``, ``initial_dice``, ``mean_hd95_mm``,
    ``mean_sdlogj``, ... and a ``pairs`` list) and, with ``figures``, ``<report>_dice_cdf.png``
    (cumulative distribution of per-label Dice, as the paper's Fig. 2) and
    ``<report>_overlay.png`` (the first pair this call registers: fixed, warped moving, label
    contours; none when ``resume`` finds every pair done).
    Every scan and label map is read and checked before the first registration. While it runs,
    the pairs finished so far are kept in :func:`unfinished_report_path` (``r.partial.json``), never
    in ``report``, which is written only when all pairs are done. With ``resume``, the pairs of that
    unfinished report (else of the report at ``report``) of the same dataset and method are kept and
    only the remaining pairs are registered.
    """
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    table_console = console or make_console()  # the result table on stdout, as the keypoint evaluation's
    console = console or make_console(stderr=True)
    if run is not None:
        if model is not None or identity:
            raise InputError("give exactly one of identity, model or run")
        model = str(run_checkpoint(run, stage))
    elif stage is not None:
        raise InputError("--stage needs --run")
    if identity == (model is not None):
        raise InputError("give exactly one of identity or model")
    dev = resolve_device(device)
    ds = load_volume_dataset(dataset, both_directions=both_directions)
    require_output_file(report)
    for extra in (unfinished_report_path(report), *(figure_paths(Path(report)) if figures else ())):
        require_output_file(extra)  # written beside the report: a folder there would stop the command midway
    pairs = list(ds.pairs)
    if require_count("--max-pairs", max_pairs, 1) is not None:
        pairs = pairs[:max_pairs]
    for p in pairs:
        for lab, img in ((p.fixed_labels, p.fixed), (p.moving_labels, p.moving)):
            require_file(img)  # a missing scan is that, not a missing label map
            if lab is None:
                raise InputError("no label map found for this image (needs a 'training' entry with 'label')", img)
            if not lab.exists():
                raise InputError("label map does not exist", lab)
    if identity:
        net, cfg, info = None, None, {"model": "identity"}
    else:
        net, cfg, info = load_model(model, seed, dev)
        cfg = _pipeline_config(cfg, warps, adam, ic)
    pending: dict = {}
    if run is not None and stage is None:
        from cyclereg.training.status import unfinished_folds, unfinished_note  # noqa: PLC0415 - training imports this

        pending = unfinished_folds(run, [None])
        if None in pending:
            console.print(unfinished_note(run, None, pending[None], info.get("extra", {}).get("stage")),
                          soft_wrap=True, markup=False)
    if model is not None and str(model) != "random":
        info["sha256"] = file_sha256(model)
    in_training = pairs_of_training_images(pairs, training_data(info))
    if in_training:
        console.print(f"note: both scans of {len(in_training)} of the {len(pairs)} pairs were training images of "
                      f"{model} (its checkpoint records their files; no labels were used in training), so their scores "
                      "are not held-out figures: " + ", ".join(in_training), soft_wrap=True, markup=False)

    overlay = None
    report = Path(report)
    unfinished = unfinished_report_path(report)
    records = []
    source = unfinished if unfinished.is_file() else report
    if resume and source.is_file():
        records = _resumed_records(source, pairs, {"dataset": str(dataset), "method": info,
                                                   "both_directions": both_directions, "config": cfg,
                                                   "label_scoring": LABEL_SCORING})
        done = {r["id"] for r in records}
        resumed_pairs = {p.id: p for p in pairs if p.id in done}
        pairs = [p for p in pairs if p.id not in done]
    else:
        resumed_pairs = {}

    def build_result(complete: bool) -> dict:
        return {
            "dataset": str(dataset), "name": ds.name, "method": info, "device": str(dev),
            "config": cfg if cfg is not None else None, "both_directions": both_directions,
            **({"run_finished": False} if None in pending else {}),
            "label_scoring": LABEL_SCORING, "pairs_in_training": in_training,
            **summarize_pairs(records),
            "label_names": {str(k): v for k, v in ds.label_names.items()},
            **provenance(dev),
            "complete": complete,
            "pairs": records,
        }

    cache = VolumeCache(EVALUATE_CACHED_VOLUMES)

    def overlay_of(p, fv: Volume, mv: Volume, fl: Volume, disp: torch.Tensor, warped_l: torch.Tensor) -> tuple:
        """What the overlay figure of pair ``p`` shows: fixed, warped moving, fixed and warped labels."""
        return p.id, fv.data.clone(), warp(mv.data[None, None].float(), disp)[0, 0], fl.data.clone(), warped_l.clone()

    def pair_volumes(p) -> tuple[Volume, Volume, Volume, Volume]:
        fv, mv = cache.get(p.fixed, labels=False), cache.get(p.moving, labels=False)
        fl, ml = cache.get(p.fixed_labels, labels=True), cache.get(p.moving_labels, labels=True)
        check_pair_grids(fv, mv, fl, ml)
        return fv, mv, fl, ml

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
                  disable=not console.is_terminal) as progress:  # a log gets the lines per pair, not a bar's last frame
        # every scan and label map is read and checked before the first registration, so that a bad
        # file stops the command before it has written anything
        checking = progress.add_task("checking inputs", total=len(pairs))
        headers: dict[tuple[Path, bool], Volume] = {}

        def header(path: Path, labels: bool) -> Volume:
            """Each file read and checked once; kept as its grid only (shape, affine; no voxels)."""
            key = (Path(path), labels)
            if key not in headers:
                vol = cache.get(path, labels=labels)
                if not labels and not identity:
                    require_contrast(vol)
                headers[key] = Volume(torch.empty(vol.shape, device="meta"), vol.affine, vol.path)
            return headers[key]

        for p in pairs:
            fv = header(p.fixed, False)
            check_pair_grids(fv, header(p.moving, False), header(p.fixed_labels, True), header(p.moving_labels, True))
            if not identity:
                require_registrable_grid(fv, cfg)
            elif min(fv.shape) < SDLOGJ_MIN_SIZE:
                raise InputError(f"volume of shape {tuple(fv.shape)} is too small to score: the smoothness of a field "
                                 f"(SDlogJ) needs at least {SDLOGJ_MIN_SIZE} voxels along every axis", fv.path)
            progress.advance(checking)
        # the unfinished report, before the first registration: an output that cannot be written fails
        # now rather than after minutes of work
        write_json(unfinished, build_result(False))
        task_total = len(pairs) + len(records)
        task = progress.add_task("evaluating pairs", total=task_total, completed=len(records))
        for p in pairs:
            fv, mv, fl, ml = pair_volumes(p)
            t0 = time.perf_counter()
            if identity:
                disp = torch.zeros(1, 3, *fv.shape)
            else:
                disp = register_pair(fv, mv, net, cfg, modality=ds.modality).detach().cpu().float()
                require_finite_result(disp, "the displacements", p.fixed)  # as register: one line, not a traceback
            seconds = time.perf_counter() - t0
            warped_l = warp_labels(ml.data[None, None], disp)[0, 0]
            scores = pair_scores(fl.data, ml.data, warped_l, disp, fv.affine[:3, :3])  # world mm, shear too
            # "seconds": the registration alone (the method's run time); scoring (label warp, Dice, HD95's
            # distance transforms, Jacobian) can take longer and is reported beside it
            rec = {"id": p.id, "fixed": str(p.fixed), "moving": str(p.moving), **scores, "seconds": seconds,
                   "scoring_seconds": time.perf_counter() - t0 - seconds}
            records.append(rec)
            if overlay is None and figures:
                overlay = overlay_of(p, fv, mv, fl, disp, warped_l)
            # the pairs so far, beside the report (never over it): a long run can be inspected, and --resume
            # continues it after an interruption
            write_json(unfinished, build_result(False))
            hd = rec["hd95_mm"]
            # one line per pair (above the bar on a terminal; in a log file, the progress of a long evaluation)
            progress.console.print(f"{len(records)}/{task_total} {p.id}: Dice {rec['initial_dice']:.3f} -> "
                                   f"{rec['dice']:.3f}, HD95 {'-' if hd is None else f'{hd:.2f}'} mm, registration "
                                   f"{seconds:.1f} s, scoring {rec['scoring_seconds']:.1f} s", soft_wrap=True,
                                   markup=False)
            progress.update(task, advance=1, description=f"{escape(p.id)}: Dice {rec['initial_dice']:.3f} -> {rec['dice']:.3f}")

    if figures and overlay is None and records and records[0]["id"] in resumed_pairs:
        # every pair came from the interrupted run's partial report (stopped while drawing its figures): the
        # overlay's pair is registered once more, as the uninterrupted command shows it
        p = resumed_pairs[records[0]["id"]]
        fv, mv, fl, ml = pair_volumes(p)
        disp = (torch.zeros(1, 3, *fv.shape) if identity
                else register_pair(fv, mv, net, cfg, modality=ds.modality).detach().cpu().float())
        overlay = overlay_of(p, fv, mv, fl, disp, warp_labels(ml.data[None, None], disp)[0, 0])
    result = build_result(True)
    with staged_file_set() as files:  # the report and its figures: a set
        write_json(files(report), result)
        if figures and records:
            dice_cdf, overlay_png = figure_paths(report)
            _plot_dice_cdf(files(dice_cdf), records, info)
            if overlay is not None:
                _plot_overlay(files(overlay_png), *overlay)
    unfinished.unlink(missing_ok=True)

    print_table(table_console, _dice_table(f"{ds.name}: {count(len(records), 'pair')} ({info.get('model')})", result))
    if result["mean_scoring_seconds"] is not None:
        console.print(f"time per pair: registration {result['mean_seconds']:.1f} s (column s), scoring "
                      f"{result['mean_scoring_seconds']:.1f} s (label warp, Dice, HD95, Jacobian)")
    if result["erased_labels"]:
        console.print(f"note: the registrations erased {result['erased_labels']} scored label(s) (see each pair's "
                      "erased_labels): they count as Dice 0 and are left out of HD95")
    return result


def figure_paths(report: Path) -> tuple[Path, Path]:
    """The figures written beside a volume report ``r.json`` with ``figures``: ``(r_dice_cdf.png,
    r_overlay.png)``."""
    return report.with_name(report.stem + "_dice_cdf.png"), report.with_name(report.stem + "_overlay.png")


def unfinished_report_path(report: Path) -> Path:
    """Where a volume ``evaluate`` keeps the pairs finished so far while it runs (``r.json`` ->
    ``r.partial.json``, ``"complete": false``); removed when the report is written."""
    report = Path(report)
    return report.with_name(f"{report.stem}.partial{report.suffix}")


LABEL_SCORING = "learn2reg-2026-12"
"""How a volume report scores labels: those present in the fixed and the unwarped moving map, label
warps with background outside (:func:`~cyclereg.metrics.scored_labels`, :func:`~cyclereg.warp.warp_labels`).
Reports without it were scored by an earlier rule; ``--resume`` does not mix the two."""


def _resumed_records(report: Path, pairs: list, run: dict) -> list[dict]:
    """The finished pair records of an unfinished report at ``report``, for the pairs still wanted;
    :class:`InputError` when it is unreadable or was made by another run (``run``: its dataset,
    method, both_directions and config, compared in their JSON form)."""
    try:
        old = json.loads(report.read_text())
    except JSON_READ_ERRORS:
        raise InputError("cannot resume: the existing report is unreadable", report) from None
    if not isinstance(old, dict):
        raise InputError("cannot resume: the existing report is not a report (no JSON object)", report)
    if any(old.get(key) != to_jsonable(value) for key, value in run.items()):
        raise InputError("cannot resume: the existing report is for another dataset, model or configuration (or was "
                         "scored by an earlier label rule)", report)
    kept = old.get("pairs", [])
    if not isinstance(kept, list) or not all(isinstance(r, dict) and PAIR_RECORD_KEYS <= r.keys() for r in kept):
        raise InputError(f"cannot resume: the existing report's pairs are not pair records (each needs "
                         f"{', '.join(sorted(PAIR_RECORD_KEYS))}); remove it or write elsewhere", report)
    wanted = {p.id for p in pairs}
    return [r for r in kept if r["id"] in wanted]


def _dice_table(title: str, result: dict):
    """The per-pair rich table of a volume ``evaluate`` report, with the means as the last row."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title)
    for col in ("pair", "Dice init", "Dice", "HD95 mm", "SDlogJ", "std logJ", "J<=0 %", "s"):
        table.add_column(col, justify="right")

    def cell(value, spec: str, scale: float = 1.0) -> str:  # a figure without a value (null in a resumed report): -
        return "-" if value is None else format(scale * value, spec)

    for r in result["pairs"]:
        table.add_row(escape(r["id"]), cell(r["initial_dice"], ".3f"), cell(r["dice"], ".3f"), cell(r["hd95_mm"], ".2f"),
                      cell(r["sdlogj"], ".3f"), cell(r["std_logj"], ".3f"), cell(r["folding_fraction"], ".3f", 100),
                      cell(r["seconds"], ".1f"))
    table.add_row("[bold]mean", cell(result["initial_dice"], ".3f"), "[bold]" + cell(result["mean_dice"], ".3f"),
                  cell(result["mean_hd95_mm"], ".2f"), cell(result["mean_sdlogj"], ".3f"),
                  cell(result["mean_std_logj"], ".3f"), cell(result["mean_folding_fraction"], ".3f", 100),
                  cell(result["mean_seconds"], ".1f"))
    return table


def _figure(**kwargs):
    """A matplotlib :class:`~matplotlib.figure.Figure` outside pyplot: no backend is chosen or switched
    (a notebook's stays as it was) and nothing is registered that would stay open if drawing fails."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _plot_dice_cdf(path: Path, records: list[dict], info: dict) -> None:
    fig = _figure(figsize=(5, 4))
    ax = fig.subplots()
    for key, label in (("initial_dice_per_label", "initial"), ("dice_per_label", str(info.get("model")))):
        vals = np.sort([v for r in records for v in r[key].values()])
        if vals.size:
            ax.plot(vals, np.arange(1, vals.size + 1) / vals.size, label=label)
    ax.set_xlabel("Dice (per label and pair)")
    ax.set_ylabel("cumulative fraction")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    _save_fig(fig, path)


def _plot_overlay(path: Path, pair_id: str, fixed: torch.Tensor, warped: torch.Tensor, fixed_l: torch.Tensor,
                  warped_l: torch.Tensor) -> None:
    import matplotlib

    fig = _figure(figsize=(12, 8))
    axes = fig.subplots(2, 3)
    for ax_idx in range(3):
        mid = fixed.shape[ax_idx] // 2
        sl = [slice(None)] * 3
        sl[ax_idx] = mid
        f = fixed[tuple(sl)].numpy().T
        w = warped[tuple(sl)].numpy().T
        fl_ = fixed_l[tuple(sl)].numpy().T
        wl = warped_l[tuple(sl)].numpy().T
        lo, hi = np.percentile(f, [1, 99])
        for row, (img, title) in enumerate(((f, "fixed + fixed labels (solid)"),
                                             (w, "warped moving + warped labels (solid), fixed (dashed)"))):
            ax = axes[row, ax_idx]
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, origin="lower")
            labs = [l for l in np.unique(np.concatenate([fl_.ravel(), wl.ravel()])) if l != 0]
            cmap = matplotlib.colormaps["tab20"]
            for n, lab in enumerate(labs):
                col = cmap(n % 20)
                src = fl_ if row == 0 else wl
                if (src == lab).any():
                    ax.contour(src == lab, levels=[0.5], colors=[col], linewidths=0.8)
                if row == 1 and (fl_ == lab).any():
                    ax.contour(fl_ == lab, levels=[0.5], colors=[col], linewidths=0.6, linestyles="dashed")
            ax.set_title(f"{title}\naxis {ax_idx} slice {mid}", fontsize=8)
            ax.axis("off")
    fig.suptitle(pair_id)
    fig.tight_layout()
    _save_fig(fig, path)


def _save_fig(fig, path: Path) -> None:
    import io

    from cyclereg.checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)  # a figure outside pyplot (_figure): nothing to close
    atomic_write_bytes(path, lambda fh: fh.write(buf.getvalue()))
