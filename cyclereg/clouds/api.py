"""File-level entry points of the keypoint-cloud path (one call per CLI command)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from cyclereg.checkpoint import (atomic_write_text, data_fingerprint, file_sha256, load_checkpoint,
                                 refuse_replacing_inputs, save_checkpoint, stale_outputs, staged_file_set,
                                 staged_outputs, training_data, training_record, write_json)
from cyclereg.clouds.features import FeatureEnsemble, GraphFeatureNet, build_graph_net, ensemble_members
from cyclereg.clouds.pipeline import (ENSEMBLE_FUSIONS, CloudRegConfig, CloudRegistration, cloud_problem,
                                      field_smoothness, min_cloud_points, register_clouds, registration_box)
from cyclereg.clouds.tps import FIT_MATRICES, fit_bytes
from cyclereg.console import Steps, count, make_console, print_note, print_table
from cyclereg.datasets import KeypointDataset, KeypointPair, load_keypoint_dataset, read_json, select_folds
from cyclereg.device import memory_bytes, provenance, resolve_device
from cyclereg.errors import (InputError, path_list, refuse_empty_paths, refuse_output_in_run, require_count,
                             require_finite_result, require_output_dir, require_output_file, require_seed, same_path)
from cyclereg.frames import UnitBox, inside_grid, world_to_voxel, zyx_grid_affine
from cyclereg.keypoints.foerstner import PairKeypointConfig
from cyclereg.metrics import JACOBIAN_MIN_SIZE, SDLOGJ_MIN_SIZE, jacobian_map, spearman, tre_stats
from cyclereg.pointio import format_csv, holds_voxel_indices, parse_points_csv, points_csv, read_points
from cyclereg.volumeio import Volume, check_same_grid, read_nifti, write_displacement, write_nifti
from cyclereg.warp import warp_between_grids, warp_labels

CHECKPOINT_KIND = "cloud"


def load_cloud_model(model: str | Path, *, seed: int = 0, device="cpu", config: CloudRegConfig | None = None,
                     recentre_passes: int | None = None, tta_passes: int | None = None,
                     ensemble_fusion: str | None = None) -> tuple[GraphFeatureNet | FeatureEnsemble, CloudRegConfig]:
    """``model="random"``: a randomly initialised network (``seed``); otherwise a checkpoint path
    (one network, or a :class:`FeatureEnsemble` when its config has ``ensemble_size > 1``).
    ``recentre_passes`` / ``tta_passes`` / ``ensemble_fusion`` (if given) override the stored
    :attr:`CloudRegConfig.recentre_passes` / :attr:`CloudRegConfig.tta_passes` /
    :attr:`CloudRegConfig.ensemble_fusion`."""
    _check_overrides(recentre_passes, tta_passes, ensemble_fusion)
    if str(model) == "random":
        config = config or CloudRegConfig()
        net = build_graph_net(config.net, seed=seed)
    else:
        net, config = _model_from_checkpoint(load_checkpoint(model, kind=CHECKPOINT_KIND), model)
    if recentre_passes is not None:
        config = replace(config, recentre_passes=recentre_passes)
    if tta_passes is not None:
        config = replace(config, tta_passes=tta_passes)
    if ensemble_fusion is not None:
        if config.ensemble_size < 2:
            raise InputError("--ensemble-fusion needs an ensemble model (cyclereg ensemble); this is one network",
                             None if str(model) == "random" else model)
        config = replace(config, ensemble_fusion=ensemble_fusion)
    return net.to(resolve_device(device)).eval(), config


def _check_overrides(recentre_passes: int | None, tta_passes: int | None, ensemble_fusion: str | None = None,
                     fusion_flag: str = "--ensemble-fusion") -> None:
    if ensemble_fusion is not None and ensemble_fusion not in ENSEMBLE_FUSIONS:
        raise InputError(f"{fusion_flag} {ensemble_fusion!r}: expected one of {', '.join(ENSEMBLE_FUSIONS)}")
    require_count("--recentre-passes", recentre_passes, 0)
    require_count("--tta-passes", tta_passes, 0)


def _model_from_checkpoint(ckpt: dict, path: str | Path) -> tuple[GraphFeatureNet | FeatureEnsemble, CloudRegConfig]:
    """Network (or ensemble) and registration settings of a loaded cloud checkpoint."""
    try:
        config = CloudRegConfig.from_dict(ckpt["config"])
        with torch.random.fork_rng(devices=[]):  # the layers' initial values are replaced: leave the caller's RNG be
            net = GraphFeatureNet(config.net) if config.ensemble_size == 1 else \
                FeatureEnsemble(config.net, config.ensemble_size)
        net.load_state_dict(ckpt["state_dict"])
    except (TypeError, ValueError, RuntimeError, KeyError, AttributeError) as exc:
        raise InputError(f"checkpoint does not match this version's cloud model ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else ''})", path) from None
    return net, config


def _fold_files(run_dir: Path) -> dict[int, Path]:
    """Final checkpoint per fold of a run directory, as :func:`fold_checkpoint` picks it."""
    names = [p.stem for p in run_dir.glob("fold*.pt")] + [p.parent.name for p in run_dir.glob("fold*/final.pt")]
    return {k: fold_checkpoint(run_dir, k) for k in sorted({int(n[4:]) for n in names if n[4:].isdigit()})}


def _refuse_source_as_output(sources: list[Path], output: Path) -> None:
    """:class:`InputError` when the ensemble's ``output`` is one of its ``sources`` (the same path, also
    through links, or the same file); a training run given as a source is named as such."""
    for s in sources:
        if same_path(output, s):
            if (s / "run.json").is_file():
                raise InputError("-o: this is a training run given as a source; the ensemble's foldK.pt and "
                                 "ensemble.json go into a folder of their own", output)
            raise InputError("-o: this is one of the sources; the ensemble records each source's SHA-256, so it "
                             "goes to a new name (nothing was written)", output)


def combine_cloud_models(sources: list[Path], output: Path, *, recentre_passes: int | None = None,
                         tta_passes: int | None = None, fusion: str = "joint") -> str:
    """Average independently trained cloud models: write one ensemble checkpoint per fold.

    ``sources``: either run directories (each with the same folds, ``foldK/final.pt`` or
    ``foldK.pt``; ``output`` becomes a directory of ``foldK.pt`` plus ``ensemble.json``) or
    checkpoint files (``output`` is one checkpoint). Members that are ensembles contribute
    all their networks. The members must share the network architecture and, after the
    ``recentre_passes`` / ``tta_passes`` overrides, every registration setting; the
    ensemble registers with those settings and combines its members as ``fusion`` says
    (:attr:`CloudRegConfig.ensemble_fusion`: ``"joint"`` one LBP per pass over the members'
    mean data cost, ``"average"`` the mean of their displacements). Everything is read and
    checked before anything is written. ``output`` may not be one of the sources (their SHA-256 in the
    ensemble's provenance would name files that no longer hold them).
    """
    sources = path_list(sources, "sources", "run directories or checkpoint files")
    refuse_empty_paths({"sources": sources, "output": output}, required=("output",), lists=("sources",))
    from cyclereg.api import require_inputs  # noqa: PLC0415 - cyclereg.api imports this module's callers

    require_inputs(*sources, folders=True)
    sources, output = [Path(s) for s in sources], Path(output)
    if len(sources) < 2:
        raise InputError("an ensemble needs at least two sources")
    if fusion is None:  # not an override here: the ensemble's own setting, always given
        raise InputError(f"--fusion None: expected one of {', '.join(ENSEMBLE_FUSIONS)}")
    _check_overrides(recentre_passes, tta_passes, fusion, fusion_flag="--fusion")
    dirs = [s.is_dir() for s in sources]
    if any(dirs) and not all(dirs):
        raise InputError("give either run directories or checkpoint files, not both")
    if all(dirs):
        if output.suffix.lower() in (".pt", ".pth") and not output.is_dir():
            raise InputError("-o: run directories make a folder of foldK.pt files, and this name looks like one "
                             "checkpoint file; give a folder name (e.g. models/my_ensemble)", output)
        require_output_dir(output)
        refuse_output_in_run(output, "-o")
        _refuse_source_as_output(sources, output)
        per_source = [_fold_files(s) for s in sources]
        folds = sorted(set().union(*per_source))
        if not folds:
            raise InputError("no per-fold checkpoints (foldK.pt or foldK/final.pt)", sources[0])
        for s, found in zip(sources, per_source):
            missing = [k for k in folds if k not in found]
            if missing:
                raise InputError(f"no checkpoint for fold(s) {', '.join(map(str, missing))}", s)
        # a fold's members must all have held out the same pairs, or the ensemble saw its test pairs
        records = [_run_records(s) for s in sources]
        held = [(s, _held_out_folds(r, s)) for s, r in zip(sources, records)]
        known = [(s, h) for s, h in held if h is not None]
        for s, h in known[1:]:
            if not same_folds(h, known[0][1]):
                raise InputError(f"its folds hold out {h}, those of {known[0][0]} {known[0][1]}: an ensemble of "
                                 "them would have seen some test pairs in training", s)
        absent = sorted(set(range(1, len(known[0][1]) + 1)) - set(folds)) if known else []
        groups = {k: [found[k] for found in per_source] for k in folds}
        from cyclereg.training.status import unfinished_folds  # noqa: PLC0415 - training imports this module

        for s in sources:  # as evaluate --run says of a run still training
            for k, nxt in sorted(unfinished_folds(s, folds).items()):
                print_note(f"fold {k} of {s} has not finished training (next: {nxt}): the ensemble takes its final.pt, "
                           "the model of an intermediate stage")
    else:
        require_output_file(output)
        _refuse_source_as_output(sources, output)
        record = output.with_name(output.stem + ".json")  # the ensemble's configuration
        if output.suffix != ".pt":  # c.xyz and c.pt would share c.json, the record of whichever came last
            raise InputError("-o: an ensemble checkpoint is a .pt file (its configuration is written beside it as "
                             "STEM.json), e.g. ensemble.pt", output)
        if record.exists() and not _is_ensemble_record(record):
            raise InputError(f"-o: the configuration would overwrite {record}, which is not an ensemble's "
                             "configuration; choose another checkpoint name", output)
        groups = {None: sources}
    changes = {k: v for k, v in (("recentre_passes", recentre_passes), ("tta_passes", tta_passes)) if v is not None}
    written: dict[int | None, tuple[CloudRegConfig, dict, list]] = {}
    for fold, files in groups.items():
        digests, first = {}, {}  # each member file's SHA-256 (checked here, recorded below)
        for f in files:
            digests[f] = digest = file_sha256(f)
            if digest in first:
                raise InputError(f"the same checkpoint as {first[digest]} (SHA-256 {digest[:12]}...): an "
                                 "ensemble needs independently trained members", f)
            first[digest] = f
        states, members, common, trained = [], [], None, []
        for src, f in zip(sources, files):
            ckpt = load_checkpoint(f, kind=CHECKPOINT_KIND)
            trained.append(training_data(ckpt))
            net, config = _model_from_checkpoint(ckpt, f)
            config = replace(config, ensemble_size=1, ensemble_fusion=fusion, **changes)
            if common is None:
                common = config
            elif config != common:
                differ = [k for k in vars(common) if getattr(common, k) != getattr(config, k)]
                hints = []
                options = (("recentre_passes", "--recentre-passes"), ("tta_passes", "--tta-passes"))
                flags = [flag for key, flag in options if key in differ]
                if flags:
                    hints.append(f"{' and '.join(flags)} N set{'s' if len(flags) == 1 else ''} "
                                 f"{'it' if len(flags) == 1 else 'them'} for all members")
                others = [k for k in differ if k not in ("recentre_passes", "tta_passes", "training_box")]
                if others:
                    hints.append(f"{', '.join(others)}: no option of this command sets "
                                 f"{'it' if len(others) == 1 else 'them'}; scripts/set_cloud_test_time.py rewrites "
                                 "the stored test-time settings of checkpoint files in place (e.g. "
                                 "--recentre-candidates K; copy the files first)")
                if "training_box" in differ:
                    hints.append("the members were trained in different unit frames: other datasets, "
                                 "or a checkpoint from before the frame was stored")
                hint = f" ({'; '.join(hints)})" if hints else ""
                raise InputError(f"registration settings differ from {files[0]} in: {', '.join(differ)}{hint}", f)
            extra = ckpt.get("extra", {})
            nets = ensemble_members(net)
            states += [m.state_dict() for m in nets]
            inner = extra.get("members")
            if isinstance(inner, list) and len(inner) == len(nets):
                added = inner  # an ensemble source: each network keeps its own provenance
            else:
                added = [{"source": str(f), "sha256": digests[f], **({"run": str(src)} if src != f else {}),
                          **({"stage": extra["stage"]} if "stage" in extra else {})}] * len(nets)
            for member in added:  # a network already in, directly or inside another ensemble source
                twin = next((m for m in members if member.get("sha256") and m.get("sha256") == member["sha256"]),
                            None)
                if twin is not None:
                    raise InputError(f"holds the network of {member.get('source')}, which is already a member "
                                     f"(from {twin.get('source')}): an ensemble needs independently trained members",
                                     f)
            members += added
        with torch.random.fork_rng(devices=[]):  # initial values replaced by the members' below
            ensemble = FeatureEnsemble(common.net, len(states))
        for m, sd in zip(ensemble.members, states):
            m.load_state_dict(sd)
        config = replace(common, ensemble_size=len(states))
        written[fold] = (config, ensemble.state_dict(), members, _union_training(trained, fold))
    if all(dirs):
        training = {}  # the members' training configurations, where their folders record them
        for r in records:
            training.update(r)
        config = written[folds[0]][0]
        with staged_file_set() as files:  # the fold checkpoints and ensemble.json: a set
            for fold, (cfg, state, members, seen) in written.items():
                save_checkpoint(files(output / f"fold{fold}.pt"), kind=CHECKPOINT_KIND, config=cfg, state_dict=state,
                                extra={"members": members, **({"training": seen} if seen else {})})
            write_json(files(output / "ensemble.json"), {
                "command": "ensemble", "sources": [str(s) for s in sources], "overrides": changes, "config": config,
                "members": {f"fold{k}": v[2] for k, v in written.items()}, "training": training})
        note = (f"; fold(s) {', '.join(map(str, absent))} of the {len(known[0][1])} its members' runs define: no "
                "source has a checkpoint, none written") if absent else ""
        return (f"wrote {len(folds)} ensemble checkpoints of {config.ensemble_size} networks each "
                f"({', '.join(f'fold{k}.pt' for k in folds)}) and ensemble.json to {output}{note}")
    config, state, members, seen = written[None]
    with staged_file_set() as files:  # the checkpoint and its record: a set
        save_checkpoint(files(output), kind=CHECKPOINT_KIND, config=config, state_dict=state,
                        extra={"members": members, **({"training": seen} if seen else {})})
        write_json(files(record), {"command": "ensemble", "sources": [str(s) for s in sources], "overrides": changes,
                                   "config": config, "members": members, "training": seen})
    said = (f"it records the {count(len(seen['pairs']), 'pair')} of {seen['dataset']} its members trained on, "
            "and evaluate names any of them it scores" if seen else
            "not every member records its training pairs: make sure no member trained on a pair you will "
            "evaluate the ensemble on")
    return (f"wrote an ensemble checkpoint of {config.ensemble_size} networks to {output} (configuration: "
            f"{record.name}); {said}")


def _is_ensemble_record(path: Path) -> bool:
    """Whether ``path`` is the configuration file an earlier ``ensemble`` wrote (which may be replaced)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and obj.get("command") == "ensemble"


def _union_training(trained: list, fold: int | None) -> dict | None:
    """The training record of an ensemble: its members' training pairs together
    (:func:`~cyclereg.checkpoint.training_data`) when every member records them; else None. An id
    that names other files in another member is kept under ``id#2``, ``id#3``, ..."""
    if not trained or any(t is None or not isinstance(t.get("pairs"), dict) for t in trained):
        return None
    names = sorted({str(t["dataset"]) for t in trained})
    pairs: dict[str, dict] = {}
    for t in trained:
        for pid, files in t["pairs"].items():
            key, n = pid, 1
            while key in pairs and pairs[key] != files:
                n += 1
                key = f"{pid}#{n}"
            pairs[key] = files
    return training_record("+".join(names), fold, pairs=pairs)


def _parse_spacing(spacing: str | Sequence[float] | None) -> tuple[float, float, float] | None:
    """``--spacing`` as ``(sx, sy, sz)`` mm: the command's text ``"sx,sy,sz"``, or (library callers) a
    sequence of three numbers."""
    if spacing is None:
        return None
    try:
        vals = tuple(float(v) for v in (spacing.split(",") if isinstance(spacing, str) else spacing)
                     if not isinstance(v, bool))  # float(True) would be a 1 mm voxel
    except (ValueError, TypeError):
        vals = ()
    if len(vals) != 3 or not all(math.isfinite(v) and v > 0 for v in vals):
        raise InputError(f"--spacing {spacing!r}: expected three positive numbers 'sx,sy,sz' (voxel size, mm)")
    return vals  # type: ignore[return-value]


def register_cloud_files(fixed: Path, moving: Path, out_dir: Path, *, model: str = "random", seed: int = 0,
                         query: Path | None = None, spacing: str | Sequence[float] | None = None,
                         device: str = "auto",
                         recentre_passes: int | None = None, tta_passes: int | None = None,
                         ensemble_fusion: str | None = None, reference: Path | None = None, moving_image: Path | None = None,
                         moving_labels: Path | None = None, disp_mm: bool = False, spread: bool = False,
                         spread_map: bool = False, jacobian: bool = False, verbose: bool = False) -> str:
    """Register two point files and write ``displacements.csv`` (+ ``query_displacements.csv``,
    ``config.json``) into ``out_dir``. With ``spread`` (needs an ensemble model; each member
    also registers the pair on its own, about 2x the time) both CSV files get a ``spread_mm``
    column: how far (root mean square, mm) the members' displacements lie from their average.

    With ``reference`` (a NIfTI of the fixed scan, whose world frame the points share) also
    ``displacement.nii.gz``: the TPS field on that grid, ``(D, H, W, 3)`` in its voxels (channel c
    along array axis c, fixed -> moving; world mm in x, y, z with ``disp_mm``), the dense path's
    convention. With ``moving_image`` (needs ``reference``; any grid of its own) also
    ``warped.nii.gz``: that image resampled onto the reference grid through the field; with
    ``moving_labels`` likewise ``warped_labels.nii.gz`` (nearest neighbour; on the moving image's
    grid when one is given). With ``spread_map``
    (needs ``reference`` and an ensemble model; implies ``spread``) also ``spread.nii.gz``: the
    members' disagreement (mm) on that grid. With ``jacobian`` (needs ``reference``) also ``jacobian.nii.gz``: the
    determinant of the Jacobian of the field on that grid (:func:`cyclereg.metrics.jacobian_map`;
    exhale fixed / inhale moving: the local volume ratio, a ventilation map).
    Everything is read and validated before anything is written. ``verbose``: with ``reference``, a line per
    step on stderr (:class:`~cyclereg.console.Steps`: the field on a large grid can take minutes); a registration
    of the clouds alone (seconds) prints nothing.
    """
    from cyclereg.api import refuse_cloud_option_pairs  # noqa: PLC0415 - cyclereg.api imports this module's callers

    refuse_cloud_option_pairs(reference=reference, spacing=spacing, moving_image=moving_image,
                              moving_labels=moving_labels, spread_map=spread_map, jacobian=jacobian, disp_mm=disp_mm)
    sp = _parse_spacing(spacing)
    if sp is not None and not any(holds_voxel_indices(f) for f in (fixed, moving, query) if f is not None):
        raise InputError("--spacing: no point file here holds voxel indices (a CSV without header), so it would "
                         "not be used; the clouds are in mm already")
    ref = read_nifti(reference) if reference is not None else None
    mov_img = read_nifti(moving_image) if moving_image is not None else None
    # headerless (Learn2Reg voxel-index) CSVs: through the scans' affines into the world frame the
    # reference's grid lives in; without a reference, index * spacing (both clouds alike)
    ref_affine = ref.affine if ref is not None else None
    mov_affine = mov_img.affine if mov_img is not None else ref_affine
    fixed_mm = read_points(fixed, spacing_mm=sp, affine=ref_affine)
    moving_mm = read_points(moving, spacing_mm=sp, affine=mov_affine)
    query_mm = read_points(query, spacing_mm=sp, affine=ref_affine) if query is not None else None
    mov_lab = _moving_labels(moving_labels, mov_img)
    if ref is not None:
        _require_points_inside(fixed_mm, ref, fixed)
    inputs = {"command": "register", "fixed": str(fixed), "moving": str(moving), "model": str(model), "seed": seed,
              "reference": str(reference) if reference else None,
              "moving_image": str(moving_image) if moving_image else None,
              # what placed voxel-index files in mm, and the points of query_displacements.csv
              "spacing_mm": [float(v) for v in sp] if sp is not None else None,
              "query": str(query) if query is not None else None}
    return _register_points_and_write(fixed_mm, moving_mm, out_dir, sources=(Path(fixed), Path(moving)), inputs=inputs,
                                      model=model, seed=seed, query_mm=query_mm, device=device,
                                      recentre_passes=recentre_passes, tta_passes=tta_passes,
                                      ensemble_fusion=ensemble_fusion, ref=ref, mov_img=mov_img, mov_lab=mov_lab,
                                      disp_mm=disp_mm, spread=spread, spread_map=spread_map, jacobian=jacobian,
                                      query=query, verbose=verbose and ref is not None)


def register_volumes_via_keypoints(fixed: Path, moving: Path, out_dir: Path, *, model: str = "random", seed: int = 0,
                                   keypoints: PairKeypointConfig = PairKeypointConfig(), lung_mask: bool = False,
                                   query: Path | None = None, device: str = "auto",
                                   recentre_passes: int | None = None, tta_passes: int | None = None,
                                   ensemble_fusion: str | None = None, moving_labels: Path | None = None,
                                   disp_mm: bool = False, spread: bool = False, spread_map: bool = False,
                                   jacobian: bool = False, verbose: bool = False) -> str:
    """Register two scans through the keypoint-cloud path in one call: Foerstner keypoints of
    both (:func:`cyclereg.keypoints.detect_keypoints`, within automatic lung masks with
    ``lung_mask``; the moving cloud denser, see :class:`PairKeypointConfig`), then
    :func:`register_cloud_files`'s registration with the fixed scan as the reference grid and
    the moving scan (any grid of its own, the same world frame) as the image to warp.

    Writes into ``out_dir``: ``fixed_keypoints.csv`` and ``moving_keypoints.csv`` (world mm),
    ``displacements.csv`` (at the fixed keypoints), ``displacement.nii.gz`` (the TPS field on the
    fixed grid, voxels; world mm with ``disp_mm``), ``warped.nii.gz`` (the moving scan on the
    fixed grid), and, as in :func:`register_cloud_files`, ``query_displacements.csv``,
    ``warped_labels.nii.gz``, ``spread.nii.gz``, ``jacobian.nii.gz`` on request, and
    ``config.json`` (with both keypoint configurations and counts). Nothing is written when a
    scan, a mask or the model is bad (:class:`InputError`, naming the file).
    """
    from cyclereg.keypoints.api import detect_keypoints  # noqa: PLC0415  (imports the lung-mask code)

    ref = read_nifti(fixed)
    # a headerless (Learn2Reg voxel-index) query CSV is on the fixed scan's grid, as with --reference
    query_mm = read_points(query, affine=ref.affine) if query is not None else None
    require_output_dir(out_dir)  # before the minutes of keypoint detection
    mov_img = read_nifti(moving)
    mov_lab = _moving_labels(moving_labels, mov_img)
    # what needs no keypoints is checked before the minutes of detection: the model and its options, and
    # that no output replaces an input
    loaded = _register_model(model, seed, device, recentre_passes, tta_passes, ensemble_fusion, spread, spread_map)
    extra_names = ["fixed_keypoints.csv", "moving_keypoints.csv"]
    names = _register_output_names(extra_names, query is not None, ref, mov_img, mov_lab, spread_map, jacobian)
    sources = (Path(fixed), Path(moving))
    refuse_replacing_inputs([*names, "config.json"], out_dir,
                            _register_inputs(sources, ref, mov_img, mov_lab, query, model))
    kp_fixed = detect_keypoints(ref, lung_mask=lung_mask, config=keypoints.fixed, device=device, verbose=verbose,
                                label="fixed scan: ")
    kp_moving = detect_keypoints(mov_img, lung_mask=lung_mask, config=keypoints.moving, device=device, verbose=verbose,
                                 label="moving scan: ")
    # registered as written into fixed_keypoints.csv / moving_keypoints.csv: the same displacements as a
    # register of those two files (the three-command workflow), not ones 5e-5 mm apart in the inputs
    extra = dict(zip(extra_names, (points_csv(kp_fixed.points_mm), points_csv(kp_moving.points_mm))))
    fixed_mm, moving_mm = (parse_points_csv(extra[name]) for name in extra_names)
    inputs = {"command": "register", "fixed": str(fixed), "moving": str(moving), "model": str(model), "seed": seed,
              "query": str(query) if query is not None else None,
              "via_keypoints": {"lung_mask": lung_mask, "fixed": keypoints.fixed, "moving": keypoints.moving,
                                "fixed_points": int(fixed_mm.shape[0]), "moving_points": int(moving_mm.shape[0]),
                                # the mm radii as the two grids apply them (whole voxels per axis)
                                "fixed_nms_radius_voxels": list(keypoints.fixed.nms_radius_voxels(ref.spacing)),
                                "moving_nms_radius_voxels": list(keypoints.moving.nms_radius_voxels(mov_img.spacing))}}
    return _register_points_and_write(fixed_mm, moving_mm, out_dir, sources=sources, inputs=inputs,
                                      model=model, seed=seed, query_mm=query_mm, device=device,
                                      recentre_passes=recentre_passes, tta_passes=tta_passes,
                                      ensemble_fusion=ensemble_fusion, ref=ref, mov_img=mov_img, mov_lab=mov_lab,
                                      disp_mm=disp_mm, spread=spread, spread_map=spread_map, jacobian=jacobian,
                                      extra_outputs=extra, query=query, loaded=loaded, verbose=verbose)


def _moving_labels(path: Path | None, moving_image: Volume | None) -> Volume | None:
    """The ``--moving-labels`` map (``None``: not given), which must lie on the moving image's grid when
    there is one (a segmentation of that scan, as the dense path requires: a map cropped or shifted
    against it would turn the rest of the scan into background without a word); without a moving image
    it keeps its own grid (it is sampled through world mm)."""
    if path is None:
        return None
    labels = read_nifti(path, labels=True)
    if moving_image is not None:
        check_same_grid(moving_image, labels, what="moving label map", ref="moving image",
                        hint="a label map goes with its scan's grid: resample it onto the moving image first")
    return labels


def _register_model(model: str, seed: int, device: str, recentre_passes: int | None, tta_passes: int | None,
                    ensemble_fusion: str | None, spread: bool, spread_map: bool) -> tuple:
    """``(device, net, config)`` of ``register``'s model, refusing ``--spread`` / ``--spread-map`` for a
    single network (they need an ensemble's members)."""
    dev = resolve_device(device)
    net, config = load_cloud_model(model, seed=seed, device=dev, recentre_passes=recentre_passes, tta_passes=tta_passes,
                                   ensemble_fusion=ensemble_fusion)
    for flag, given in (("--spread", spread), ("--spread-map", spread_map)):
        if given and config.ensemble_size < 2:
            raise InputError(f"{flag} needs an ensemble model (cyclereg ensemble); this is one network", model)
    return dev, net, config


def _register_output_names(extra: list[str], query: bool, ref: Volume | None, mov_img: Volume | None,
                           mov_lab: Volume | None, spread_map: bool, jacobian: bool) -> list[str]:
    """The files ``register`` on the cloud path writes besides config.json, in the order it lists them:
    the text outputs (``extra`` + displacements.csv, query_displacements.csv), then the field, then the
    volumes on the reference grid."""
    texts = sorted([*extra, "displacements.csv", *(["query_displacements.csv"] if query else [])])
    if ref is None:
        return texts
    volumes = [name for name, wanted in (("warped.nii.gz", mov_img is not None), ("warped_labels.nii.gz",
               mov_lab is not None), ("spread.nii.gz", spread_map), ("jacobian.nii.gz", jacobian)) if wanted]
    return texts + ["displacement.nii.gz"] + sorted(volumes)


def _register_inputs(sources: tuple[Path, Path], ref: Volume | None, mov_img: Volume | None, mov_lab: Volume | None,
                     query: Path | None, model: str) -> list[Path]:
    """The files ``register`` on the cloud path reads, none of which an output may replace."""
    return [*sources, *(v.path for v in (ref, mov_img, mov_lab) if v is not None),
            *((query,) if query is not None else ()), *((Path(model),) if model != "random" else ())]


def _register_points_and_write(fixed_mm: torch.Tensor, moving_mm: torch.Tensor, out_dir: Path, *,
                               sources: tuple[Path, Path], inputs: dict, model: str, seed: int,
                               query_mm: torch.Tensor | None, device: str, recentre_passes: int | None,
                               tta_passes: int | None, ensemble_fusion: str | None, ref: Volume | None,
                               mov_img: Volume | None, mov_lab: Volume | None, disp_mm: bool, spread: bool,
                               spread_map: bool, jacobian: bool, extra_outputs: dict[str, str] | None = None,
                               query: Path | None = None, loaded: tuple | None = None, verbose: bool = False) -> str:
    """The part of ``register`` after the inputs are read: validate, register ``(N, 3)`` fixed to
    ``(M, 3)`` moving points (world mm), and write the outputs (see :func:`register_cloud_files`)
    plus ``extra_outputs`` (file name -> text), ``config.json`` = ``inputs`` + the resolved run; ``query``:
    the query file ``query_mm`` was read from (an input no output may replace); ``loaded``: the model as
    :func:`_register_model` returned it, if loaded already; ``verbose``: a line per step on stderr
    (:class:`~cyclereg.console.Steps`)."""
    for vol in (mov_img, mov_lab):
        if vol is not None:
            _require_points_inside(moving_mm, vol, sources[1])
    if jacobian and ref is not None and min(ref.shape) < JACOBIAN_MIN_SIZE:
        raise InputError(f"--jacobian needs a reference grid of at least {JACOBIAN_MIN_SIZE} voxels along every axis "
                         f"(central differences), got {tuple(ref.shape)}", ref.path)
    out_dir = require_output_dir(out_dir)
    written = _register_output_names([*(extra_outputs or {})], query_mm is not None, ref, mov_img, mov_lab, spread_map,
                                     jacobian)
    # before the model and the registration's seconds to minutes, as the dense path does
    refuse_replacing_inputs([*written, "config.json"], out_dir,
                            _register_inputs(sources, ref, mov_img, mov_lab, query, model))
    dev, net, config = loaded or _register_model(model, seed, device, recentre_passes, tta_passes, ensemble_fusion,
                                                 spread, spread_map)
    # the spline through the fixed points: for --query / --reference (densifying) and each re-centred LBP pass
    densifying = query_mm is not None or ref is not None
    require_registrable(fixed_mm, moving_mm, config, sources, device=dev,
                        spline=densifying or config.recentre_passes > 0)
    box, frame = registration_box(fixed_mm, moving_mm, config)
    steps = Steps(verbose)
    t0 = time.perf_counter()
    with steps(f"cloud registration, {fixed_mm.shape[0]} to {moving_mm.shape[0]} points ({dev})"):
        reg = register_clouds(fixed_mm.to(dev), moving_mm.to(dev), net, config, box=box, spread=spread or spread_map)
    seconds = time.perf_counter() - t0
    disp = reg.displacements_mm.cpu()
    require_finite_result(disp, "the displacements", sources[0])
    cols = {"x_mm": fixed_mm[:, 0], "y_mm": fixed_mm[:, 1], "z_mm": fixed_mm[:, 2],
            "dx_mm": disp[:, 0], "dy_mm": disp[:, 1], "dz_mm": disp[:, 2]}
    point_spread = reg.spread_mm  # with --spread: how much the members disagree at each point
    if point_spread is not None:
        cols["spread_mm"] = point_spread.cpu()
    outputs = {**(extra_outputs or {}), "displacements.csv": format_csv(cols)}
    # the spline is an N x N solve (O(N^2) memory, O(N^3) time): fitted only for the outputs that need it
    spline, volumes, fields, fixed_outside = None, {}, {}, None
    densify = ("thin-plate spline at the query points" if ref is None else
               f"dense field on the {'x'.join(map(str, ref.shape))} grid" + (", warped scan" if mov_img else ""))
    with steps(densify) if densifying else nullcontext():
        if densifying:
            spline = reg.spline()
        if query_mm is not None:
            q = reg.at(query_mm.to(dev), spline).cpu()
            qcols = {"x_mm": query_mm[:, 0], "y_mm": query_mm[:, 1], "z_mm": query_mm[:, 2],
                     "dx_mm": q[:, 0], "dy_mm": q[:, 1], "dz_mm": q[:, 2]}
            if point_spread is not None:
                qcols["spread_mm"] = reg.spread_at(query_mm.to(dev)).cpu()
            outputs["query_displacements.csv"] = format_csv(qcols)
            lo, hi = fixed_mm.min(0).values, fixed_mm.max(0).values
            margin = QUERY_EXTENT_MARGIN * (hi - lo)
            outside = int(((query_mm < lo - margin) | (query_mm > hi + margin)).any(dim=1).sum())
        if ref is not None:
            # fixed points beyond the reference grid: its field there is extrapolated, or the grid is not the
            # fixed scan's (another frame); said, not refused (_require_points_inside refuses none inside)
            fixed_outside = int((~_inside(fixed_mm, ref)).sum())
            field_vox = reg.dense(ref.affine, ref.shape, spline).cpu()
            fields = {"displacement.nii.gz": field_vox}  # written with its unit by write_displacement
            if mov_img is not None:
                volumes["warped.nii.gz"] = warp_between_grids(mov_img.data[None, None], mov_img.affine,
                                                              field_vox, ref.affine)[0, 0]
            if mov_lab is not None:
                volumes["warped_labels.nii.gz"] = warp_labels(mov_lab.data[None, None], field_vox,
                                                             labels_affine=mov_lab.affine, fixed_affine=ref.affine)[0, 0]
            if spread_map:
                volumes["spread.nii.gz"] = reg.dense_spread(ref.affine, ref.shape).cpu()[0, 0]
            if jacobian:
                volumes["jacobian.nii.gz"] = jacobian_map(field_vox)
    if written != sorted(outputs) + sorted(fields) + sorted(volumes):  # one list of names, checked early too
        raise RuntimeError(f"register's outputs {sorted(outputs) + sorted(fields) + sorted(volumes)} are not the "
                           f"names it checked, {written}")
    with steps("write"), staged_outputs(out_dir) as stage:  # all files reach out_dir together, or none
        for name, text in outputs.items():
            atomic_write_text(stage / name, text)
        for name, field in fields.items():
            write_displacement(stage / name, field, ref.affine, unit="mm" if disp_mm else "voxel")
        for name, data in volumes.items():
            write_nifti(stage / name, data, ref.affine)
        write_json(stage / "config.json", {
            **provenance(dev), **inputs, "device": str(dev), "outputs": written,
            "moving_labels": str(mov_lab.path) if mov_lab is not None else None,
            "displacement_unit": ("mm" if disp_mm else "voxel") if ref is not None else None,
            "unit_box": reg.box, "unit_frame": frame, "config": config, "seconds": seconds,
            "query_points_outside_fixed_extent": None if query_mm is None else outside,
            "fixed_points_outside_reference": fixed_outside})
        # what an earlier register wrote into this folder and this one does not (never the inputs)
        stage.inputs = _register_inputs(sources, ref, mov_img, mov_lab, query, model)
        stage.find_stale = lambda: stale_outputs(out_dir, written, keep=tuple(stage.inputs))
    mean = disp.norm(dim=1).mean().item()
    disagreement = "" if point_spread is None else \
        f", members disagree by {point_spread.mean().item():.2f} mm on average"
    far = "" if query_mm is None or not outside else (
        f"; note: {outside} of the {query_mm.shape[0]} query points lie outside the fixed cloud's extent, where the "
        "spline extrapolates (trust their displacements less)")
    if fixed_outside:
        far += (f"; note: {fixed_outside} of the {fixed_mm.shape[0]} fixed points lie outside the --reference grid "
                "(is it the fixed scan, in the clouds' world frame?)")
    return (f"registered {fixed_mm.shape[0]} fixed to {moving_mm.shape[0]} moving points in {seconds:.1f} s "
            f"(unit frame: {frame}); mean |u| {mean:.2f} mm{disagreement}; wrote {', '.join(written)} "
            f"to {out_dir}{far}")


QUERY_EXTENT_MARGIN = 0.1
"""Query points farther than this share of the fixed cloud's extent outside its bounding box (per
axis) are reported as extrapolated by ``register --query``."""


def _require_overlap(fixed_mm: torch.Tensor, moving_mm: torch.Tensor, sources: tuple[Path, Path],
                     what: str = "") -> None:
    """Refuse two clouds whose bounding boxes are disjoint along some world axis: the pair is not in
    one world frame (or not pre-aligned), and a candidate search among the nearest moving points
    cannot find a match for any fixed point. ``what`` prefixes the message."""
    f_lo, f_hi = fixed_mm.min(0).values, fixed_mm.max(0).values
    m_lo, m_hi = moving_mm.min(0).values, moving_mm.max(0).values
    apart = (m_lo > f_hi) | (f_lo > m_hi)
    if bool(apart.any()):
        a = int(apart.nonzero()[0])
        raise InputError(f"{what}its points do not overlap those of {sources[0]} along world {'xyz'[a]} "
                         f"(fixed {f_lo[a]:.1f}..{f_hi[a]:.1f} mm, moving {m_lo[a]:.1f}..{m_hi[a]:.1f} mm): "
                         "are both in the same world frame and pre-aligned?", sources[1])


def require_registrable(fixed_mm: torch.Tensor, moving_mm: torch.Tensor, config: CloudRegConfig,
                        sources: tuple[Path, Path], *, what: str = "", spline: bool = True,
                        device: torch.device | str | None = None) -> None:
    """:class:`InputError` naming the file of a cloud ``config`` cannot register (too few points; a
    flat fixed cloud, on which the thin-plate spline is fitted; clouds that do not overlap,
    :func:`_require_overlap`; with ``spline``, the spline is fitted, a fixed cloud whose spline would not fit
    in the memory of ``device``, :func:`require_spline_fits`); ``what`` prefixes the message."""
    need_fixed, need_moving = min_cloud_points(config)
    for points, need, flat, path in ((fixed_mm, need_fixed, True, sources[0]),
                                     (moving_mm, need_moving, False, sources[1])):
        problem = cloud_problem(points, need, spline=flat)
        if problem:
            raise InputError(what + problem, path)
    _require_overlap(fixed_mm, moving_mm, sources, what)
    if spline:
        require_spline_fits(int(fixed_mm.shape[0]), sources[0], fixed_mm.device if device is None else device, what)


def _memory_owner(device: torch.device | str) -> str:
    """Whose memory :func:`~cyclereg.device.memory_bytes` gave, for a message: ``this machine`` (CPU) or ``cuda:0``."""
    device = torch.device(device)
    return "this machine" if device.type == "cpu" else str(device)


def require_spline_fits(n_points: int, path: Path, device: torch.device | str, what: str = "") -> None:
    """:class:`InputError` naming ``path`` when the thin-plate spline through its ``n_points`` fixed points
    would need more memory (:func:`~cyclereg.clouds.tps.fit_bytes`) than ``device`` has: refused before the
    registration's minutes, not an allocation error (or the OS's kill) after them."""
    need, have = fit_bytes(n_points), memory_bytes(device)
    if have is not None and need > have:
        raise InputError(f"{what}{n_points} fixed points: the thin-plate spline through them needs {need / 1e9:.1f} GB "
                         f"of memory ({FIT_MATRICES} float64 matrices of (N + 4)^2 entries; its solve grows as N^3), "
                         f"more than the {have / 1e9:.1f} GB of {_memory_owner(device)}; register fewer points "
                         "(cyclereg keypoints --max-points)", path)


def _inside(points_mm: torch.Tensor, volume: Volume) -> torch.Tensor:
    """``(N,)`` bool: which of the points ``(N, 3)`` (world mm) lie within the volume's voxels."""
    return inside_grid(world_to_voxel(points_mm.double().cpu(), torch.from_numpy(volume.affine)), volume.shape)


def _require_points_inside(points_mm: torch.Tensor, volume: Volume, points_path: Path) -> None:
    """Refuse a volume whose world extent holds none of the points: the two are not in one frame
    (e.g. voxel-index CSVs read without ``--spacing``, or the wrong scan)."""
    inside = _inside(points_mm, volume)
    if not bool(inside.any()):
        raise InputError(f"none of the {points_mm.shape[0]} points of {points_path} lies inside this volume "
                         f"(shape {tuple(volume.shape)}): are both in the same world frame (mm)?", volume.path)


def exported_models(folder: Path) -> bool:
    """Whether ``folder`` is a folder of exported per-fold models (``foldK.pt``; made by ``cyclereg
    ensemble`` or ``scripts/run_model_set.py``) rather than a run directory (``run.json``)."""
    return not (Path(folder) / "run.json").is_file() and any(Path(folder).glob("fold*.pt"))


def exported_model_files(folder: str | Path, what: str = "a folder of fold*.pt checkpoints") -> list[Path]:
    """The ``foldK.pt`` checkpoints of a folder of exported per-fold models (:func:`exported_models`), sorted,
    each loaded once as a check (:func:`load_cloud_model`), so that a script names a missing folder or a
    damaged checkpoint before its first registration; :class:`InputError` naming ``folder`` (``what``: the
    folder the message asks for) otherwise."""
    if not Path(folder).is_dir():
        raise InputError(f"no such folder ({what} is needed)", folder)
    files = sorted(Path(folder).glob("fold*.pt"))
    if not files:
        raise InputError(f"holds no fold*.pt checkpoints ({what} is needed)", folder)
    for path in files:
        load_cloud_model(path)
    return files


def _stage0_network(run_dir: Path) -> str:
    """Which ``--model random --seed N`` builds the network of a run's stage-0 labels, for messages."""
    from cyclereg.training.clouds import CloudCycleConfig
    from cyclereg.training.scheduler import initial_network_seed

    try:
        cfg = CloudCycleConfig.from_dict(read_json(Path(run_dir) / "run.json").get("config", {}))
    except (InputError, TypeError, ValueError):
        return "--model random evaluates an untrained network"
    if cfg.reg.net != CloudRegConfig().net:
        return "--model random evaluates an untrained network of the default settings, not this run's"
    return (f"'--model random --seed {initial_network_seed(cfg.seed, 0)}' evaluates that network with the "
            "test-time settings, not the label refinement")


def fold_checkpoint(run_dir: Path, fold: int, stage: int | None = None) -> Path:
    """Checkpoint of ``fold`` in a run directory: ``foldK/final.pt`` (or a committed
    ``foldK.pt``), or for one stage ``foldK/stage{stage}.pt``, else ``foldK/final.pt`` if it is that
    stage's (:func:`cyclereg.api.stage_checkpoint`: a run whose stage files were removed)."""
    from cyclereg.api import final_stage, stage_checkpoint  # noqa: PLC0415 - cyclereg.api imports this module's callers

    if stage is not None:
        path = stage_checkpoint(Path(run_dir) / f"fold{fold}", stage)
        if path is not None:
            return path
    names = [f"fold{fold}/stage{stage}.pt"] if stage is not None else [f"fold{fold}/final.pt", f"fold{fold}.pt"]
    for name in names:
        if (Path(run_dir) / name).is_file():
            return Path(run_dir) / name
    hint = ""
    if stage == 0:
        hint = (" (stage 0 trains no network: its pseudo labels come from a randomly initialised one, so there is no "
                f"stage-0 checkpoint; {_stage0_network(run_dir)})")
    elif stage is not None:
        have = sorted(int(f.stem[len("stage"):]) for f in (Path(run_dir) / f"fold{fold}").glob("stage*.pt")
                      if f.stem[len("stage"):].isdigit())
        kept = final_stage(Path(run_dir) / f"fold{fold}")
        if have:
            hint = f" (this fold has the checkpoints of stage(s) {', '.join(map(str, have))})"
        elif kept is not None:
            hint = f" (this fold keeps no per-stage checkpoints; its final.pt is stage {kept}'s)"
        elif exported_models(run_dir):
            hint = " (this folder keeps no per-stage checkpoints: an exported or ensemble folder has one model per fold)"
        else:
            hint = " (this fold has no trained stage yet)"
    raise InputError(f"no checkpoint for fold {fold} (expected {' or '.join(names)}){hint}", run_dir)


def dataset_box(ds: KeypointDataset) -> UnitBox | None:
    if ds.has_volume_grid:
        return UnitBox.from_volume(ds.volume_shape_zyx, ds.spacing_zyx_mm)
    return None


def evaluate_keypoint_dataset(dataset: Path, report: Path, *, identity: bool = False, model: str | None = None,
                              run: Path | None = None, stage: int | None = None, seed: int = 0,
                              max_pairs: int | None = None, recentre_passes: int | None = None,
                              tta_passes: int | None = None, ensemble_fusion: str | None = None,
                              device: str = "auto", smoothness: bool = True, spread: bool = False,
                              quiet: bool = False, errors_csv: Path | None = None, folds: str | None = None) -> dict:
    """TRE before/after at the landmarks of every pair, SDlogJ of the TPS field, time per pair.

    ``folds`` (``"all"``, the default, or one fold number): only the pairs the dataset puts in that
    fold, e.g. to score a run whose other folds have not been trained yet.

    ``recentre_passes``, ``tta_passes`` and ``ensemble_fusion`` override the models' stored
    values (see :class:`CloudRegConfig`).

    With ``model``, pairs whose keypoint files the checkpoint records among its training data
    (:func:`pairs_in_training`) are named in a note and in the report (``pairs_in_training``, and
    ``in_training`` per case); with ``run``, such a pair is refused (its fold model is not held out).

    Pairs without landmarks are left out (named in a note and in the report, ``without_landmarks``);
    :class:`InputError` if no selected pair has them. ``max_pairs`` counts the pairs with landmarks.

    Writes ``report`` (JSON: ``mean_tre_mm``, ``initial_tre_mm``, ``cases``; ``mean_sdlogj``, ``mean_std_logj``
    and ``mean_folding_fraction`` are means over the ``num_sdlogj_cases`` cases scored for smoothness, ``None``
    when none is: a dataset without a volume grid, or ``smoothness=False``) and prints a table;
    with ``errors_csv`` also one row per landmark (``pair, fold, landmark, before_mm, after_mm``;
    ``landmark`` is the 0-based row in the landmark files), for box plots and paired tests, and the
    report names that file (``errors_csv``: its path from the report's folder, its file name beside it).

    With ``spread`` (ensemble models only; each member also registers every pair on its own,
    about 2x the time, the fused result unchanged), also the members' disagreement
    (:func:`member_spread` of their TPS fields) at the keypoints and landmarks of each case, its
    Spearman correlation with the landmark errors (per case, pooled, and across case means: does
    the landmark-free spread flag the large errors?) and a ``spread_mm`` column in
    ``errors_csv``. Reported, never used to choose anything.
    """
    from rich.progress import Progress

    if stage is not None and run is None:
        raise InputError("--stage needs --run (it picks a stage of a run directory's checkpoints)")
    run = None if run is None else Path(run)  # a path given as text, as everywhere else
    _check_overrides(recentre_passes, tta_passes, ensemble_fusion)
    ds = load_keypoint_dataset(dataset)
    if smoothness and not identity and ds.volume_shape_zyx and min(ds.volume_shape_zyx) < SDLOGJ_MIN_SIZE:
        raise InputError(f"volume_shape_zyx {list(ds.volume_shape_zyx)}: SDlogJ of the registered fields needs at "
                         f"least {SDLOGJ_MIN_SIZE} voxels along every axis of the volume box", ds.path)
    for out in (report, errors_csv):
        if out is not None:
            require_output_file(out)
    pairs = list(ds.pairs)
    if folds not in (None, "all"):
        chosen = set(select_folds(ds, folds, "--folds"))
        pairs = [p for p in pairs if ds.fold_of(p.id) in chosen]
    # a pair without landmarks (a training pair of one's own dataset) has no TRE: left out, named below
    without_landmarks = [p.id for p in pairs if p.fixed_landmarks is None or p.moving_landmarks is None]
    pairs = [p for p in pairs if p.fixed_landmarks is not None and p.moving_landmarks is not None]
    if not pairs:
        which = (f"--folds {folds}: none of the pairs of fold {folds}" if folds not in (None, "all")
                 else "none of the dataset's pairs")
        raise InputError(f"{which} has landmarks (fixed_landmarks and moving_landmarks): there is no TRE "
                         "to evaluate", dataset)
    pairs = pairs[: require_count("--max-pairs", max_pairs, 1)]
    dev = resolve_device(device)
    box = dataset_box(ds)
    overrides = dict(recentre_passes=recentre_passes, tta_passes=tta_passes, ensemble_fusion=ensemble_fusion)
    records = _run_records(run) if run is not None else {}  # what the run records of its training
    trained: dict[int, dict | None] = {}  # with --run: each fold checkpoint's training record
    used: dict[int | None, Path] = {}  # the checkpoint file of each model
    models = _evaluation_models(ds, pairs, dataset, run=run, records=records, stage=stage, model=model, seed=seed,
                                device=dev, overrides=overrides, trained=trained, paths=used)
    checkpoints = {("all" if k is None else str(k)): checkpoint_provenance(path) for k, path in sorted(
        used.items(), key=lambda item: -1 if item[0] is None else item[0])}
    for k, (_, cfg) in models.items():  # each fold's pairs are registered with its own model's configuration
        if ("all" if k is None else str(k)) in checkpoints:
            checkpoints["all" if k is None else str(k)]["config"] = cfg
    if spread and (not models or any(cfg.ensemble_size < 2 for _, cfg in models.values())):
        raise InputError("--spread needs ensemble models (cyclereg ensemble): the disagreement of their members"
                         + ("" if models else "; the identity has none"), run if run is not None else model)
    default_config = CloudRegConfig()
    console = make_console(stderr=True, quiet=quiet)
    if run is not None and _held_out_folds(records, run) is None:
        recorded = sorted(k for k, rec in trained.items() if rec is not None)
        checked = (f"checked against what the checkpoints of fold(s) {', '.join(map(str, recorded))} record of their "
                   "training pairs" if recorded else "that each pair's fold model held it out is not checked")
        console.print(f"note: {run} records no training folds (no run.json, or an ensemble.json or model_set.json "
                      f"naming runs that do): {checked}", soft_wrap=True, markup=False)
    if run is not None and stage is None:
        from cyclereg.training.status import unfinished_folds, unfinished_note  # noqa: PLC0415 - training imports this

        for k, nxt in sorted(unfinished_folds(run, list(used)).items()):  # with --run, used holds folds only
            checkpoints[str(k)]["run_finished"] = False
            console.print(unfinished_note(run, k, nxt, checkpoints[str(k)]["stage"]), soft_wrap=True, markup=False)
    if without_landmarks:
        console.print(f"note: {len(without_landmarks)} pair(s) without landmarks are left out (no TRE to score): "
                      f"{', '.join(without_landmarks)}", soft_wrap=True, markup=False)
    one_model = model is not None and run is None  # one checkpoint (or random network) for every pair
    in_training: set[str] = set()
    if one_model:
        in_training = pairs_in_training(pairs, checkpoint_training(model))
        if in_training:
            console.print(f"note: {len(in_training)} of the {len(pairs)} pairs were training pairs of {model} (its "
                          f"checkpoint records their keypoint files: {', '.join(sorted(in_training))}); no landmarks "
                          "were used in training, but their TRE is not a held-out figure; --run RUN_DIR evaluates "
                          "each pair with the fold model that held it out", soft_wrap=True, markup=False)
    # every pair's files are read and checked before the first registration (a bad landmark file of the
    # last pair stops the command at once, not after the others have been registered)
    points = {p.id: _pair_points(ds, p, models.get(ds.fold_of(p.id) if run is not None else None,
                                               (None, default_config))[1], dev) for p in pairs}
    cases = []
    rows: dict[str, list] = {"pair": [], "fold": [], "landmark": [], "before_mm": [], "after_mm": [], "spread_mm": []}
    # the bar on a terminal only: elsewhere (a log file) the per-pair lines below are the progress
    with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("registering pairs", total=len(pairs))
        for p in pairs:
            fold = ds.fold_of(p.id)
            net, config = models.get(fold if run is not None else None, (None, default_config))
            # a trained network registers in the frame it was trained in (registration_box), as with
            # `register`; the dataset's volume box is the frame of untrained networks and the identity
            frame = box if config.training_box is None else None
            t0 = time.perf_counter()
            case = _evaluate_pair(p, fold, net, config, box=frame, ds=ds, device=dev, smoothness=smoothness,
                                  spread=spread, rows=rows, points=points[p.id])
            case["scoring_seconds"] = time.perf_counter() - t0 - case["seconds"]
            if one_model:
                case["in_training"] = p.id in in_training
            cases.append(case)
            # one line per pair (above the bar on a terminal; in a log file, the progress of a long evaluation)
            progress.console.print(
                f"{len(cases)}/{len(pairs)} {p.id}" + (f" (fold {fold})" if fold is not None else "")
                + f": TRE {case['tre_before_mm']['mean']:.2f} -> {case['tre_after_mm']['mean']:.2f} mm, "
                f"registration {case['seconds']:.1f} s, scoring {case['scoring_seconds']:.1f} s", soft_wrap=True,
                markup=False)
            progress.advance(task)
    mean = lambda key, sub=None: float(sum((c[key][sub] if sub else c[key]) for c in cases) / len(cases))  # noqa: E731
    method = "identity" if identity else (f"run:{run}" + (f":stage{stage}" if stage is not None else "")
                                          if run is not None else f"model:{model}")
    if folds not in (None, "all"):
        method += f" (fold {folds} only)"
    if not identity:
        method += "".join(f" ({name}={value})" for name, value in overrides.items() if value is not None)
    result = {
        **provenance(dev),
        "dataset": str(dataset), "name": ds.name, "method": method, "seed": seed if model == "random" else None,
        "device": str(dev), "num_pairs": len(cases),
        "folds": "all" if folds in (None, "all") else [int(folds)],
        "initial_tre_mm": mean("tre_before_mm", "mean"), "mean_tre_mm": mean("tre_after_mm", "mean"),
        # over the cases scored for smoothness, as the volume reports' means (None: no case is)
        "mean_sdlogj": _mean_of_scored(cases, "sdlogj"), "mean_std_logj": _mean_of_scored(cases, "std_logj"),
        "mean_folding_fraction": _mean_of_scored(cases, "folding_fraction"),
        "num_sdlogj_cases": sum(c.get("sdlogj") is not None for c in cases),
        "mean_seconds": mean("seconds"), "mean_scoring_seconds": mean("scoring_seconds"),
        "config": _shared_config(models, default_config),
        "checkpoints": checkpoints,
        **({"pairs_in_training": sorted(in_training)} if one_model else {}),
        **({"errors_csv": os.path.relpath(os.path.realpath(errors_csv), os.path.realpath(Path(report).parent))}
           if errors_csv is not None else {}),
        "without_landmarks": without_landmarks,
        "cases": cases,
    }
    if spread and cases:
        # how well the members' landmark-free disagreement ranks the errors (reporting only)
        landmark_spread = torch.tensor(rows["spread_mm"])
        result["member_spread"] = {
            "mean_at_landmarks_mm": float(landmark_spread.mean()),
            "spearman_landmarks": spearman(landmark_spread, torch.tensor(rows["after_mm"])),
            "spearman_cases": spearman(torch.tensor([c["member_spread_mm"]["landmarks"]["mean"] for c in cases]),
                                       torch.tensor([c["tre_after_mm"]["mean"] for c in cases])),
        }
    print_table(make_console(quiet=quiet), _tre_table(f"{ds.name} — {method}", result))
    scored = "landmarks, SDlogJ of the dense TPS field" if smoothness and not identity and ds.has_volume_grid else "landmarks"
    console.print(f"time per pair: registration {result['mean_seconds']:.1f} s (column time), scoring "
                  f"{result['mean_scoring_seconds']:.1f} s ({scored})", soft_wrap=True)
    with staged_file_set() as files:  # the report and its per-landmark errors: a set
        write_json(files(report), result)
        if errors_csv is not None:
            if "member_spread" not in result:
                del rows["spread_mm"]
            text = io.StringIO()  # csv quotes an id holding a comma, quote or line break (any text names a pair)
            writer = csv.writer(text, lineterminator="\n")
            writer.writerow(rows)
            writer.writerows([f"{pid}", f"{fold}", f"{i}", *(f"{v:.4f}" for v in values)]
                             for pid, fold, i, *values in zip(*rows.values()))
            atomic_write_text(files(errors_csv), text.getvalue())
    return result


def _mean_of_scored(cases: list[dict], key: str) -> float | None:
    """The mean of ``key`` over the cases that have it (one rule with :func:`cyclereg.dense.api.summarize_pairs`),
    ``None`` when none has it."""
    values = [c[key] for c in cases if c.get(key) is not None]
    return float(sum(values) / len(values)) if values else None


def _evaluation_models(ds: KeypointDataset, pairs: list, dataset: Path, *, run: Path | None, records: dict,
                       stage: int | None, model: str | None, seed: int, device,
                       overrides: dict, trained: dict | None = None,
                       paths: dict | None = None) -> dict[int | None, tuple]:
    """The models ``evaluate`` registers with: ``{fold: (net, config)}`` for the folds of ``pairs``
    with ``run`` (``records``: its :func:`_run_records`), ``{None: (net, config)}`` with ``model``,
    ``{}`` for the identity. A pair a fold model trained on, by the folder's records or by its
    checkpoint's own (:func:`checkpoint_training`, then filled into ``trained`` per fold), is refused.
    ``paths``, if given, receives the checkpoint file of each key (none for a random network)."""
    trained = {} if trained is None else trained
    paths = {} if paths is None else paths
    models: dict[int | None, tuple] = {}
    if run is not None:
        if not ds.folds:
            raise InputError("--run needs a dataset with folds", dataset)
        held_out = _held_out_folds(records, run)
        seen = _record_pairs(records)  # pairs of the run's dataset: each trained on by every fold not holding it out
        for p in pairs:
            k = ds.fold_of(p.id)
            if k is None:
                raise InputError(f"pair {p.id} is in no fold", dataset)
            if held_out is not None and p.id in seen and (k > len(held_out) or p.id not in held_out[k - 1]):
                kept = ", ".join(held_out[k - 1]) if k <= len(held_out) else "nothing (the run has fewer folds)"
                raise InputError(f"pair {p.id} is in fold {k} of the dataset, but fold {k} of this run held out "
                                 f"{kept}: its model may have trained on {p.id}; evaluate with the folds the run "
                                 "was trained with", run)
            try:
                path = fold_checkpoint(run, k, stage)
            except InputError as exc:  # a run trained for some folds only
                if stage is not None and (exported_models(run) or any((run / f"fold{k}").glob("stage*.pt"))):
                    raise  # the fold has other stages, or the folder has none: its message says which
                raise InputError(f"{exc.message} (pair {p.id} is in fold {k}; --folds N evaluates only the pairs of "
                                 "a fold the run has a checkpoint for)", exc.path) from None
            if k not in models:
                models[k] = load_cloud_model(path, device=device, **overrides)
                trained[k] = checkpoint_training(path)
                paths[k] = path
            match = training_matches([p], trained[k]).get(p.id)
            if match:
                raise InputError(f"pair {p.id} is in fold {k} of the dataset, but the checkpoint of fold {k} trained on "
                                 f"its keypoint files (as training pair(s) {', '.join(match)}, by their content): "
                                 "evaluate with the folds the run was trained with, and list each pair's data once",
                                 path)
    elif model is not None:
        models[None] = load_cloud_model(model, seed=seed, device=device, **overrides)
        if str(model) != "random":
            paths[None] = Path(model)
    return models


def _shared_config(models: dict, default: CloudRegConfig) -> CloudRegConfig | None:
    """The registration configuration a report records at its top: the one every model has (``default``
    without models), ``None`` where the fold models differ (each fold's training box is its own unless the
    dataset gives a volume box); each checkpoint's entry records its own either way."""
    configs = [cfg for _, cfg in models.values()]
    if not configs:
        return default
    return configs[0] if all(cfg == configs[0] for cfg in configs) else None


def checkpoint_provenance(path: Path) -> dict:
    """What a report records of a checkpoint it used: ``{"path", "sha256", "stage"}`` (``stage``: the
    training stage it holds, ``None`` where it records none, e.g. an ensemble's)."""
    extra = load_checkpoint(path, kind=CHECKPOINT_KIND).get("extra") or {}
    stage = extra.get("stage")
    return {"path": str(path), "sha256": file_sha256(path), "stage": stage if isinstance(stage, int) else None}


def checkpoint_training(model: str | Path) -> dict | None:
    """The training record a cloud checkpoint keeps (:func:`~cyclereg.checkpoint.training_data`);
    ``None`` for ``"random"`` or a checkpoint without one."""
    if str(model) == "random":
        return None
    return training_data(load_checkpoint(model, kind=CHECKPOINT_KIND))


def training_matches(pairs: list[KeypointPair], record: dict | None) -> dict[str, list[str]]:
    """For each of ``pairs`` whose fixed and moving keypoint files a model trained on, by its training
    ``record`` (:func:`~cyclereg.checkpoint.data_fingerprint` of the files, whatever the dataset and
    the ids are called; in either role, so a reversed pair counts): ``{pair id: [the training pair
    ids that hold those files]}``."""
    if not record or not isinstance(record.get("pairs"), dict):
        return {}
    holders: dict[str, set[str]] = {}
    for tid, files in record["pairs"].items():
        if isinstance(files, dict):
            for fp in files.values():
                holders.setdefault(fp, set()).add(tid)
    found = {}
    for p in pairs:
        fixed, moving = data_fingerprint(p.fixed_keypoints), data_fingerprint(p.moving_keypoints)
        if fixed in holders and moving in holders:
            found[p.id] = sorted(holders[fixed] | holders[moving])
    return found


def pairs_in_training(pairs: list[KeypointPair], record: dict | None) -> set[str]:
    """Ids of those ``pairs`` both of whose clouds a model trained on (:func:`training_matches`)."""
    return set(training_matches(pairs, record))


def run_held_out_pairs(run: Path) -> list[list[str]] | None:
    """The pairs each fold of a run directory held out from training (``[[ids of fold 1], ...]``), from
    its ``run.json`` or, for a directory made by ``cyclereg ensemble``, from its members' runs
    recorded in ``ensemble.json`` (which must agree); ``None`` when the directory records neither.
    Every other pair of the run's dataset (:func:`_record_pairs`) was in the fold's training set."""
    return _held_out_folds(_run_records(run), run)


def _held_out_folds(records: dict[str, dict], run: Path) -> list[list[str]] | None:
    """:func:`run_held_out_pairs` from the folder's :func:`_run_records`."""
    folds = {name: meta.get("folds") for name, meta in records.items()}
    known = [f for f in folds.values() if f]
    if not known:
        return None
    if any(not same_folds(f, known[0]) for f in known):
        raise InputError("the runs of this ensemble's members have different folds: " + "; ".join(
            f"{name}: {f}" for name, f in folds.items()), run)
    return [list(f) for f in known[0]]


def same_folds(a: list, b: list) -> bool:
    """Whether two fold lists hold out the same pairs fold by fold (order within a fold aside)."""
    return len(a) == len(b) and all(set(x) == set(y) for x, y in zip(a, b))


def _record_pairs(records: dict[str, dict]) -> set[str]:
    """The ids of the pairs of the dataset(s) the :func:`_run_records` were trained on; empty when none."""
    return {str(pid) for meta in records.values() for pid in (meta.get("pairs") or [])}


def _run_records(run: Path) -> dict[str, dict]:
    """The training records (``run.json`` contents) a folder of per-fold models keeps: its own
    ``run.json``; the members' runs in ``ensemble.json`` (``cyclereg ensemble``); the source run's in
    ``model_set.json`` (``scripts/run_model_set.py``); ``{}`` when it keeps none."""
    run = Path(run)
    if (run / "run.json").is_file():
        return {str(run): _checked_record(read_json(run / "run.json"), run / "run.json")}
    for name in ("ensemble.json", "model_set.json"):
        if (run / name).is_file():
            training = read_json(run / name).get("training") or {}
            if not isinstance(training, dict):
                raise InputError("'training' should map each run to its run.json record", run / name)
            return {k: _checked_record(meta, run / name) for k, meta in training.items() if isinstance(meta, dict)}
    return {}


def _checked_record(meta: dict, path: Path) -> dict:
    """``meta`` (a training record) when its ``folds`` and ``pairs`` are lists as cyclereg writes them
    (``folds``: lists of pair ids); :class:`InputError` naming ``path`` otherwise."""
    folds, pairs = meta.get("folds"), meta.get("pairs")
    if folds is not None and not (isinstance(folds, list) and all(isinstance(f, list) for f in folds)):
        raise InputError(f"'folds' of a training record should be lists of pair ids, got {folds!r}", path)
    if pairs is not None and not isinstance(pairs, list):
        raise InputError(f"'pairs' of a training record should be a list of pair ids, got {pairs!r}", path)
    return meta


def _pair_points(ds: KeypointDataset, p: KeypointPair, config: CloudRegConfig,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """The keypoints and landmarks ``(fixed, moving, fixed landmarks, moving landmarks)`` (mm, CPU) of a
    pair of ``ds`` to evaluate with ``config`` on ``device``, read and checked (:class:`InputError` naming the
    file; a spline beyond ``device``'s memory too)."""
    fixed, moving = ds.read_points(p.fixed_keypoints), ds.read_points(p.moving_keypoints)
    lm_f, lm_m = ds.read_landmarks(p, f"pair {p.id}")
    require_registrable(fixed, moving, config, (p.fixed_keypoints, p.moving_keypoints), device=device)
    _require_in_dataset_grid(ds, fixed, p.fixed_keypoints)
    return fixed, moving, lm_f, lm_m


def _require_in_dataset_grid(ds: KeypointDataset, points_mm: torch.Tensor, path: Path) -> None:
    """:class:`InputError` naming ``path`` when ``ds`` has a volume grid (the frame of its points: the unit box
    the networks work in, and where SDlogJ is scored) and none of the points ``(N, 3)`` lies in it."""
    if not ds.has_volume_grid:
        return
    vox = world_to_voxel(points_mm.double().cpu(), zyx_grid_affine(ds.volume_shape_zyx, ds.spacing_zyx_mm))
    if not bool(inside_grid(vox, tuple(ds.volume_shape_zyx)).any()):
        raise InputError(f"none of its {points_mm.shape[0]} keypoints lies in the dataset's volume grid "
                         f"({' x '.join(map(str, ds.volume_shape_zyx))} voxels of "
                         f"{' x '.join(f'{s:g}' for s in ds.spacing_zyx_mm)} mm, z y x, from the origin), the frame its "
                         "points are in; check the grid's size and spacing, or the points' units", path)


def _evaluate_pair(p, fold: int | None, net, config: CloudRegConfig, *, box: UnitBox | None, ds: KeypointDataset,
                   device, smoothness: bool, spread: bool, rows: dict[str, list],
                   points: tuple[torch.Tensor, ...]) -> dict:
    """Register one pair (``net=None``: the identity) and measure it at its landmarks: the case
    record of the report; every landmark's errors are appended to ``rows`` (the errors CSV).
    ``points``: the pair's :func:`_pair_points` (read and checked before the first registration)."""
    fixed, moving, lm_f, lm_m = (t.to(device) for t in points)
    t0 = time.perf_counter()
    reg: CloudRegistration = register_clouds(fixed, moving, net, config, box=box, spread=spread)
    spline = reg.spline()
    u_lm = reg.at(lm_f, spline)
    seconds = time.perf_counter() - t0
    before = (lm_f - lm_m).norm(dim=1).cpu()
    after = (lm_f + u_lm - lm_m).norm(dim=1).cpu()
    n_lm = before.shape[0]
    rows["pair"] += [p.id] * n_lm
    rows["fold"] += [fold or 0] * n_lm
    rows["landmark"] += list(range(n_lm))
    rows["before_mm"] += before.tolist()
    rows["after_mm"] += after.tolist()
    case = {"id": p.id, "fold": fold, "n_fixed": fixed.shape[0], "n_moving": moving.shape[0],
            "n_landmarks": lm_f.shape[0], "tre_before_mm": tre_stats(before), "tre_after_mm": tre_stats(after),
            "seconds": seconds}
    spread_lm = reg.spread_at(lm_f)  # with spread only; not part of the registration time
    if spread_lm is not None:
        spread_lm = spread_lm.cpu()
        rows["spread_mm"] += spread_lm.tolist()
        case["member_spread_mm"] = {"keypoints": tre_stats(reg.spread_mm.cpu()), "landmarks": tre_stats(spread_lm)}
        case["spread_tre_spearman"] = spearman(spread_lm, after)
    if smoothness and ds.has_volume_grid:  # no volume grid: TRE only (the README's dataset description)
        # zero field (identity): J = 1 everywhere, so every spread is exactly 0
        case.update({"sdlogj": 0.0, "std_logj": 0.0, "folding_fraction": 0.0} if net is None else
                    field_smoothness(reg, ds.volume_shape_zyx, ds.spacing_zyx_mm, spline))
    return case


def _tre_table(title: str, result: dict):
    """The per-case rich table of an ``evaluate`` report (with a spread column for ensembles)."""
    from rich.markup import escape
    from rich.table import Table

    cases, with_spread = result["cases"], "member_spread" in result
    table = Table(title=title)
    for col in ("case", "TRE before [mm]", "TRE after [mm]", "p25/p50/p75 after", "SDlogJ", "time [s]") + \
            (("spread [mm]",) if with_spread else ()):
        table.add_column(col, justify="right")
    for c in cases:
        a = c["tre_after_mm"]
        table.add_row(escape(c["id"]), f"{c['tre_before_mm']['mean']:.2f}", f"{a['mean']:.2f} ± {a['std']:.2f}",
                      f"{a['p25']:.2f}/{a['p50']:.2f}/{a['p75']:.2f}",
                      f"{c['sdlogj']:.3f}" if "sdlogj" in c else "-", f"{c['seconds']:.1f}",
                      *((f"{c['member_spread_mm']['landmarks']['mean']:.2f}",) if with_spread else ()))
    table.add_row("mean", f"{result['initial_tre_mm']:.2f}", f"{result['mean_tre_mm']:.2f}", "",
                  f"{result['mean_sdlogj']:.3f}" if result["mean_sdlogj"] is not None else "-",
                  f"{result['mean_seconds']:.1f}",
                  *((f"{result['member_spread']['mean_at_landmarks_mm']:.2f}",) if with_spread else ()))
    return table


def run_demo(out_dir: Path | None = None, *, seed: int = 0, device: str = "auto") -> dict:
    """The embedded default job: register a synthetic breathing pair with a random network.

    Prints the error against the known displacements before and after; with ``out_dir``
    writes the clouds, the ground truth, the prediction and ``report.json``.
    """
    from rich.markup import escape

    from cyclereg.clouds.synthetic import make_breathing_pair
    from cyclereg.pointio import write_points

    require_seed(seed)
    if out_dir is not None:
        require_output_dir(out_dir)
        refuse_output_in_run(out_dir, "-o")
    console = make_console()
    dev = resolve_device(device)
    pair = make_breathing_pair(seed)
    # the clouds as fixed.csv / moving.csv hold them (4 decimals): 'register' of those files gives this
    # displacements.csv (a point 5e-5 mm off can flip a candidate)
    fixed_mm, moving_mm = (parse_points_csv(points_csv(pts)) for pts in (pair.fixed_mm, pair.moving_mm))
    net, config = load_cloud_model("random", seed=seed, device=dev)
    console.print(f"synthetic lung pair (seed {seed}): {pair.fixed_mm.shape[0]} fixed / "
                  f"{pair.moving_mm.shape[0]} moving keypoints; random graph CNN + sparse LBP on {dev}")
    t0 = time.perf_counter()
    reg = register_clouds(fixed_mm.to(dev), moving_mm.to(dev), net, config)
    seconds = time.perf_counter() - t0
    truth = pair.displacement_mm.to(dev)
    before = truth.norm(dim=1).cpu()
    after = (reg.displacements_mm - truth).norm(dim=1).cpu()
    result = {"seed": seed, "device": str(dev), "seconds": seconds,
              "error_before_mm": tre_stats(before), "error_after_mm": tre_stats(after), "config": config}
    console.print(f"error at the fixed keypoints: before {result['error_before_mm']['mean']:.2f} mm, "
                  f"after {result['error_after_mm']['mean']:.2f} mm "
                  f"(median {result['error_after_mm']['p50']:.2f} mm) in {seconds:.1f} s")
    if out_dir is not None:
        out = Path(out_dir)
        d, t = reg.displacements_mm.cpu(), pair.displacement_mm
        with staged_file_set() as files:  # the four files: a set
            write_points(files(out / "fixed.csv"), pair.fixed_mm)  # the text fixed_mm was parsed from
            write_points(files(out / "moving.csv"), pair.moving_mm)
            atomic_write_text(files(out / "displacements.csv"), format_csv(
                {"x_mm": pair.fixed_mm[:, 0], "y_mm": pair.fixed_mm[:, 1], "z_mm": pair.fixed_mm[:, 2],
                 "dx_mm": d[:, 0], "dy_mm": d[:, 1], "dz_mm": d[:, 2],
                 "true_dx_mm": t[:, 0], "true_dy_mm": t[:, 1], "true_dz_mm": t[:, 2]}))
            write_json(files(out / "report.json"), result)
        console.print(f"wrote fixed.csv, moving.csv, displacements.csv, report.json to {escape(str(out))}",
                      soft_wrap=True)
    return result
