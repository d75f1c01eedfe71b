"""Contracts of the session's mends, from a mutation audit (2026-12-07).

Audited: the library lines changed on 2026-12-07 (``git diff 9e648ed`` of ``cyclereg`` and ``cyclereg_cli``):
the min-sum graph checks (:func:`cyclereg.clouds.native.require_graph`), the Learn2Reg readers' new helpers
(:func:`cyclereg.dense.data.label_guess`, :func:`~cyclereg.dense.data.dataset_modality`,
:func:`~cyclereg.dense.data.training_pairs`), the seed ranges (:mod:`cyclereg.errors`), the hd95 voxel metric,
difficulty weights of NaN / inf disagreements, the foreign ``config.json`` rule of ``stale_outputs``, the
temporary names of atomic writes, ``.txt`` point files and NIfTI spatial units of ``.hdr/.img`` pairs. Hand-made
mutants of those lines that the session's own tests let through are killed here; every expected value is
derived by hand (a known count, a known path, a known distance, an exact message fragment). Real bugs found are
pinned as strict xfails (``BUG: ...``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from cyclereg.clouds import lbp
from cyclereg.clouds import native as cloud_native
from cyclereg.errors import InputError


# ----------------------------------------------------------------------------- min-sum graph checks
def _graph(n=6, k=4):
    g = torch.Generator().manual_seed(3)
    unary = torch.rand(n, k, generator=g)
    cand = torch.randn(n, k, 3, generator=g) * 0.1
    # a chain 0-1-2-...: edges i->i+1 and back, reverse pairs them
    a = torch.arange(n - 1)
    edge_index = torch.stack([torch.cat([a, a + 1]), torch.cat([a + 1, a])])
    e = edge_index.shape[1]
    reverse = torch.cat([torch.arange(n - 1, e), torch.arange(0, n - 1)])
    return unary, cand, edge_index, reverse


def test_require_graph_accepts_a_chain_whose_reverse_pairs_its_edges():
    unary, cand, edge_index, reverse = _graph()
    e = edge_index.shape[1]
    assert torch.equal(edge_index[:, reverse], edge_index.flip(0))  # the helper's graph is what it says
    cloud_native.require_graph(unary, cand, edge_index, reverse)
    assert e == 10


@pytest.mark.parametrize("fused", [True, False])
def test_a_reverse_index_of_minus_one_is_refused_naming_reverse(fused):
    """-1 would index the last edge in torch and before the buffer in C: refused with the range [0, E)."""
    unary, cand, edge_index, reverse = _graph()
    reverse = reverse.clone()
    reverse[2] = -1
    with pytest.raises(ValueError, match=r"^reverse: edge indices must lie in \[0, 10\), got \[-1, "):
        lbp.min_sum(unary, cand, edge_index, reverse, 3.0, 2, fused=fused)


def test_a_float_reverse_is_refused_naming_reverse():
    unary, cand, edge_index, reverse = _graph()
    with pytest.raises(ValueError, match=r"^reverse: expected \(10,\) integers"):
        cloud_native.require_graph(unary, cand, edge_index, reverse.float())


@pytest.mark.parametrize("fused", [True, False])
def test_min_sum_of_a_graph_without_edges_is_its_unary_costs(fused):
    """No edge, no message: each node's belief is its unary cost (an empty graph is no error)."""
    unary, cand, _, _ = _graph()
    edge_index, reverse = torch.zeros(2, 0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    cloud_native.require_graph(unary, cand, edge_index, reverse)
    belief = lbp.min_sum(unary, cand, edge_index, reverse, 3.0, 2, fused=fused)
    torch.testing.assert_close(belief, unary)


# ----------------------------------------------------------------------------- Learn2Reg readers
def test_label_guess_replaces_the_last_images_folder_only_and_never_the_file_name():
    from cyclereg.dense.data import label_guess

    assert label_guess(Path("/d/imagesTr/imagesTs/a.nii.gz")) == Path("/d/imagesTr/labelsTs/a.nii.gz")
    assert label_guess(Path("/d/imagesTs/x/a.nii.gz")) == Path("/d/labelsTs/x/a.nii.gz")
    assert label_guess(Path("imagesTr/a.nii.gz")) == Path("labelsTr/a.nii.gz")  # a relative path's first folder
    assert label_guess(Path("/d/x/imagesTr")) is None  # a file named imagesTr is no folder
    assert label_guess(Path("/d/imagesTr/x/imagesTr")) == Path("/d/labelsTr/x/imagesTr")
    assert label_guess(Path("/d/x/a.nii.gz")) is None


@pytest.mark.parametrize("modality, expected", [
    ({"0": "CT", "1": "CT"}, "CT"),  # one modality named on two channels
    ({}, None),
    ("MR", "MR"),
    (None, None),
])
def test_dataset_modality_of_one_modality(tmp_path, modality, expected):
    from cyclereg.dense.data import dataset_modality

    assert dataset_modality({"modality": modality}, tmp_path / "ds.json") == expected


def test_dataset_modality_of_three_channels_names_them_all_sorted(tmp_path):
    from cyclereg.dense.data import dataset_modality

    with pytest.raises(InputError, match=r"ds\.json.*names several modalities \(CT, MR, PET\)"):
        dataset_modality({"modality": {"0": "MR", "1": "CT", "2": "PET"}}, tmp_path / "ds.json")
    with pytest.raises(InputError, match=r"ds\.json.*should name the imaging modality of each channel.*got \{'0': nan\}"):
        dataset_modality({"modality": {"0": float("nan")}}, tmp_path / "ds.json")


def _paired_json(tmp_path, pairs, **extra):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"pairings": "paired", "training_paired_images": [
        {"fixed": f"./imagesTr/{f}", "moving": f"./imagesTr/{m}"} for f, m in pairs], **extra}))
    return p


def test_training_pairs_lists_the_pairs_in_order_and_holds_out_val_scans(tmp_path):
    from cyclereg.dense.data import training_pairs

    root = tmp_path.resolve() / "imagesTr"
    p = _paired_json(tmp_path, [("a", "b"), ("c", "d"), ("e", "f")],
                     registration_val=[{"fixed": "./imagesTr/d", "moving": "./imagesTr/x"}])
    assert training_pairs(p, held_out=False) == [(root / "a", root / "b"), (root / "c", root / "d"),
                                                 (root / "e", root / "f")]
    assert training_pairs(p) == [(root / "a", root / "b"), (root / "e", root / "f")]  # (c, d) holds val scan d


@pytest.mark.parametrize("pairs, message", [
    ([("a", "b"), ("a", "a")], "training_paired_images entry 1 pairs a scan with itself"),
    ([("a", "b"), ("c", "d"), ("a", "b")], "training_paired_images entries 0 and 2 list the same pair"),
])
def test_training_pairs_refuses_a_self_pair_or_a_repeated_pair_naming_the_entries(tmp_path, pairs, message):
    from cyclereg.dense.data import training_pairs

    with pytest.raises(InputError, match=message):
        training_pairs(_paired_json(tmp_path, pairs))


def test_training_pairs_of_a_paired_dataset_without_its_list_is_refused(tmp_path):
    from cyclereg.dense.data import training_pairs

    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"pairings": "paired", "training": [{"image": "./imagesTr/a"}]}))
    with pytest.raises(InputError, match="needs its pairs in 'training_paired_images'"):
        training_pairs(p)
    p.write_text(json.dumps({"training": [{"image": "./imagesTr/a"}]}))  # no pairings: unpaired
    assert training_pairs(p) is None


def test_training_pairs_of_an_unpaired_dataset_with_an_empty_pair_list_is_none(tmp_path):
    from cyclereg.dense.data import training_pairs

    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"pairings": "unpaired", "numPairedTraining": 0, "training_paired_images": [],
                             "training": [{"image": "./imagesTr/a"}, {"image": "./imagesTr/b"}]}))
    assert training_pairs(p) is None


# ----------------------------------------------------------------------------- seeds
def test_seed_ranges_end_exactly_at_their_largest():
    from cyclereg.errors import MAX_MODEL_SEED, MAX_SEED, require_config_seed, require_seed

    assert MAX_SEED == 2**32 - 1
    assert MAX_MODEL_SEED == 1000 * (2**32 - 1) + 1  # the stage-1 network seed of the largest run seed
    assert require_seed(MAX_SEED) == MAX_SEED
    with pytest.raises(InputError, match=f"--seed {MAX_SEED + 1}: need a whole number from 0 to {MAX_SEED}"):
        require_seed(MAX_SEED + 1)
    assert require_seed(MAX_MODEL_SEED, "--model", largest=MAX_MODEL_SEED) == MAX_MODEL_SEED
    with pytest.raises(InputError, match=f"--model {MAX_MODEL_SEED + 1}: need a whole number from 0 to "
                                         f"{MAX_MODEL_SEED}"):
        require_seed(MAX_MODEL_SEED + 1, "--model", largest=MAX_MODEL_SEED)
    assert require_config_seed(0) == 0 and require_config_seed(MAX_SEED) == MAX_SEED
    for bad in (-1, MAX_SEED + 1, 1.5, "3", True):
        with pytest.raises(ValueError, match=r"^seed="):
            require_config_seed(bad)


# ----------------------------------------------------------------------------- difficulty weights
def test_difficulty_weights_rank_inf_above_finite_and_nan_above_inf():
    """Four pairs: ranks 0..3 take the logits +r, +r/3, -r/3, -r (sigmoid); an inf disagreement is the
    hardest finite-or-not number, a NaN harder still, and two NaNs tie (the mean of their logits)."""
    from cyclereg.training.scheduler import difficulty_weights

    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    w = difficulty_weights({"nan": math.nan, "inf": math.inf, "one": 1.0, "zero": 0.0}, logit_range=3.0)
    assert w == pytest.approx({"zero": sig(3.0), "one": sig(1.0), "inf": sig(-1.0), "nan": sig(-3.0)})
    w = difficulty_weights({"n1": math.nan, "a": 2.0, "n2": math.nan}, logit_range=2.0)
    assert w == pytest.approx({"a": sig(2.0), "n1": sig(-1.0), "n2": sig(-1.0)})
    w = difficulty_weights({"i1": math.inf, "i2": math.inf}, logit_range=2.0)
    assert w == pytest.approx({"i1": 0.5, "i2": 0.5})


# ----------------------------------------------------------------------------- paired training sets
def test_listed_training_set_goes_both_ways_then_cuts_and_numbers_scans_by_first_appearance(tmp_path):
    """Listed pairs (c, a), (b, d): with directions both, (c, a), (a, c), (b, d), (d, b); the first three kept by
    max_train_pairs 3; scans numbered as they first appear (c 0, a 1, b 2, d 3)."""
    from cyclereg.training.api import _listed_training_set
    from cyclereg.training.dense import DenseCycleConfig

    a, b, c, d = (tmp_path / n for n in "abcd")
    images, pairs = _listed_training_set(tmp_path / "ds.json", DenseCycleConfig(directions="both", max_train_pairs=3),
                                         [(c, a), (b, d)])
    assert images == [c, a, b, d]
    assert pairs == [(0, 1), (1, 0), (2, 3)]
    images, pairs = _listed_training_set(tmp_path / "ds.json", DenseCycleConfig(), [(c, a), (b, d)])
    assert images == [c, a, b, d] and pairs == [(0, 1), (2, 3)]
    with pytest.raises(InputError, match="no training pair left in 'training_paired_images' .*--train-images all"):
        _listed_training_set(tmp_path / "ds.json", DenseCycleConfig(), [])


# ----------------------------------------------------------------------------- stale outputs of a register folder
@pytest.mark.parametrize("record, stale", [
    ({"command": "register", "cyclereg_version": "0", "outputs": ["a.csv", "b.csv"]}, ["b.csv"]),
    ({"command": "register", "cyclereg_version": "0", "outputs": {"files": ["a.csv", "b.csv"]}}, ["b.csv"]),
    ({"command": "register", "outputs": ["a.csv", "b.csv"]}, []),  # no cyclereg_version: another tool's
    ({"command": "keypoints", "cyclereg_version": "0", "outputs": ["a.csv", "b.csv"]}, []),
    ({"cyclereg_version": "0", "outputs": ["a.csv", "b.csv"]}, []),
    (["a.csv", "b.csv"], []),
])
def test_stale_outputs_come_only_from_a_register_record_of_cyclereg(tmp_path, record, stale):
    from cyclereg.checkpoint import stale_outputs

    (tmp_path / "config.json").write_text(json.dumps(record))
    for name in ("a.csv", "b.csv"):
        (tmp_path / name).write_text("x")
    assert stale_outputs(tmp_path, ["a.csv"]) == [tmp_path / n for n in stale]


def test_an_atomic_write_of_a_255_character_name_keeps_200_of_them_in_its_temporary_name(tmp_path, monkeypatch):
    import tempfile

    from cyclereg.checkpoint import TEMP_NAME_KEEP, atomic_write_bytes

    prefixes = []
    real = tempfile.mkstemp
    monkeypatch.setattr(tempfile, "mkstemp", lambda **kw: (prefixes.append(kw["prefix"]), real(**kw))[1])
    name = "n" * 255
    atomic_write_bytes(tmp_path / name, lambda fh: fh.write(b"ok"))
    assert (tmp_path / name).read_bytes() == b"ok"
    assert TEMP_NAME_KEEP == 200 and prefixes == ["." + "n" * 200 + "."]
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left


# ----------------------------------------------------------------------------- NIfTI spatial units
@pytest.mark.parametrize("suffix, cls", [(".img", nib.Nifti1Pair), (".nii", nib.Nifti2Image)])
@pytest.mark.parametrize("unit, mm", [("meter", 1000.0), ("micron", 0.001)])
def test_a_header_in_metres_or_microns_of_a_pair_or_nifti2_is_read_in_mm(tmp_path, suffix, cls, unit, mm):
    """Voxel sizes 2, 3, 4 and origin (10, 20, 30) in the header's unit: the affine in mm is both times ``mm``."""
    from cyclereg.volumeio import read_nifti

    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    affine[:3, 3] = [10.0, 20.0, 30.0]
    img = cls(np.zeros((4, 5, 6), np.float32), affine)
    img.header.set_xyzt_units(unit)
    nib.save(img, tmp_path / f"v{suffix}")
    vol = read_nifti(tmp_path / f"v{suffix}")
    want = np.diag([2.0 * mm, 3.0 * mm, 4.0 * mm, 1.0])
    want[:3, 3] = [10.0 * mm, 20.0 * mm, 30.0 * mm]
    np.testing.assert_allclose(vol.affine, want, rtol=1e-6)


# ----------------------------------------------------------------------------- hd95's voxel metric
def test_voxel_metric_takes_column_lengths_and_keeps_only_a_sheared_map():
    from cyclereg.metrics import _voxel_metric

    c, s = math.cos(0.4), math.sin(0.4)
    rotated = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([2.0, 3.0, 4.0])
    sizes, linear = _voxel_metric(rotated)
    np.testing.assert_allclose(sizes, [2.0, 3.0, 4.0])  # column lengths (row lengths would differ)
    assert linear is None
    sheared = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    sizes, linear = _voxel_metric(sheared)
    np.testing.assert_allclose(sizes, [1.0, math.sqrt(2.0), 1.0])
    assert linear is not None and np.array_equal(linear, sheared)
    for bad in (np.diag([1.0, 0.0, 1.0]), np.full((3, 3), np.nan)):
        with pytest.raises(ValueError, match=r"^spacing: expected a finite, invertible \(3, 3\)"):
            _voxel_metric(bad)
    with pytest.raises(ValueError, match=r"^spacing=\(.*\): expected three positive voxel sizes \[mm\] or a \(3, 3\)"):
        _voxel_metric((1.0, 0.0, 1.0))


def test_hd95_names_a_bad_spacing_as_the_numbers_given():
    from cyclereg.metrics import hd95

    a = torch.ones(4, 4, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"^spacing=\(1\.0, 0\.0, 1\.0\): expected three positive voxel sizes"):
        hd95(a, a, spacing=(1.0, 0.0, 1.0))


@pytest.mark.parametrize("step, mm", [((0, 1, 0), math.sqrt(2.0)), ((1, 0, 0), 1.0)])
def test_hd95_of_two_voxels_on_a_sheared_grid_is_the_length_of_the_mapped_step(step, mm):
    """One voxel of the label in each map, ``step`` apart: the distance is ``|L step|`` for the map
    ``L = [[1, 1, 0], [0, 1, 0], [0, 0, 1]]`` (its columns, not its rows)."""
    from cyclereg.metrics import hd95

    a = torch.zeros(4, 4, 4, dtype=torch.int64)
    b = torch.zeros(4, 4, 4, dtype=torch.int64)
    a[1, 1, 1] = 1
    b[1 + step[0], 1 + step[1], 1 + step[2]] = 1
    sheared = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert hd95(a, b, spacing=sheared)[1] == pytest.approx(mm)


def _zero_pixdim1(path: Path) -> None:
    """Set ``pixdim[1]`` (header bytes 80..84, float32) of an uncompressed little-endian NIfTI-1 header to 0."""
    raw = bytearray(path.read_bytes())
    raw[80:84] = np.float32(0.0).tobytes()
    path.write_bytes(bytes(raw))


def test_a_zero_pixdim_is_no_error_where_the_sform_places_the_volume(tmp_path):
    """With an sform (code 2) the pixdims place nothing: the volume is read on the sform's 2, 3, 4 mm grid."""
    from cyclereg.volumeio import read_nifti

    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.diag([2.0, 3.0, 4.0, 1.0]))
    img.set_qform(None, code=0)
    img.set_sform(np.diag([2.0, 3.0, 4.0, 1.0]), code=2)
    nib.save(img, tmp_path / "v.nii")
    _zero_pixdim1(tmp_path / "v.nii")
    with open(tmp_path / "v.nii", "rb") as fh:
        assert float(nib.Nifti1Header.from_fileobj(fh, check=False)["pixdim"][1]) == 0.0
    np.testing.assert_allclose(read_nifti(tmp_path / "v.nii").affine, np.diag([2.0, 3.0, 4.0, 1.0]))


# ----------------------------------------------------------------------------- label-map conflicts
def _volume_json(tmp_path, training, test=()):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"training": list(training), "test": list(test),
                             "registration_val": [{"fixed": "./imagesTr/a.nii.gz", "moving": "./imagesTr/b.nii.gz"}]}))
    return p


def test_one_image_given_two_label_maps_is_refused_naming_the_first_entry_that_gave_one(tmp_path):
    """Training entries 0 and 1 agree (a -> La); test entry 0 gives a another map: the message names the first
    entry that gave one (training entry 0) and the conflicting one."""
    from cyclereg.dense.data import load_volume_dataset

    ds = _volume_json(tmp_path, [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/La.nii.gz"},
                                 {"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/La.nii.gz"}],
                      test=[{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/Lz.nii.gz"}])
    with pytest.raises(InputError, match=r"ds\.json: training entry 0 and test entry 0 give the image "
                                         r"\./imagesTr/a\.nii\.gz two label maps$"):
        load_volume_dataset(ds)
    ds = _volume_json(tmp_path, [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/La.nii.gz"},
                                 {"image": "./imagesTr/b.nii.gz", "label": "./labelsTr/Lb.nii.gz"}])
    pair = load_volume_dataset(ds).pairs[0]
    root = tmp_path.resolve()
    assert (pair.fixed_labels, pair.moving_labels) == (root / "labelsTr/La.nii.gz", root / "labelsTr/Lb.nii.gz")


# ----------------------------------------------------------------------------- dense run configuration checks
@pytest.mark.parametrize("key, value, message", [
    ("lr", 0.0, "lr=0.0: need a finite number > 0"),
    ("lr_min", -1e-9, "lr_min=-1e-09: need a finite number >= 0"),
    ("max_train_pairs", 0, "max_train_pairs=0: need a whole number, 1 or more (or none)"),
    ("mind_dilation", 0, "mind_dilation=0: need a whole number, 1 or more"),
    ("label_stride", 0, "label_stride=0: need a whole number, 1 or more"),
    ("loss_border", -1, "loss_border=-1: need a whole number, 0 or more"),
    ("stages", 0, "stages=0: need a whole number, 1 or more"),
    ("cpu_bf16", 1, "cpu_bf16=1: expected true or false"),
    ("seed", -1, "seed=-1: need a whole number from 0 to 4294967295"),
])
def test_a_dense_configuration_setting_just_outside_its_range_is_refused_naming_it(key, value, message):
    from cyclereg.training.dense import DenseCycleConfig

    with pytest.raises(ValueError) as e:
        DenseCycleConfig(**{key: value}).validate()
    assert str(e.value) == message


@pytest.mark.parametrize("key, value", [("lr_min", 0.0), ("loss_border", 0), ("mind_radius", 0), ("ncc_radius", 0),
                                        ("max_train_pairs", 1), ("max_train_pairs", None), ("seed", 2**32 - 1),
                                        ("sampling_logit_range", 0.0)])
def test_a_dense_configuration_setting_at_the_edge_of_its_range_is_taken(key, value):
    from cyclereg.training.dense import DenseCycleConfig

    assert getattr(DenseCycleConfig(**{key: value}).validate(), key) == value


# ----------------------------------------------------------------------------- streams that cannot encode
def _run_python(code: str, **env_extra):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **env_extra}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=60)


_PRINT_NON_ASCII = ("from cyclereg.console import tolerate_unencodable; tolerate_unencodable(); "
                    "print('gr\\u00fc\\u00df')")


def test_tolerate_unencodable_escapes_under_an_ascii_io_encoding():
    res = _run_python(_PRINT_NON_ASCII, PYTHONIOENCODING="ascii")
    assert res.returncode == 0 and res.stdout == b"gr\\xfc\\xdf\n", res.stderr


def test_tolerate_unencodable_escapes_in_the_c_locale_without_utf8_mode():
    res = _run_python(_PRINT_NON_ASCII, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0",
                      PYTHONIOENCODING="")
    assert res.returncode == 0 and res.stdout == b"gr\\xfc\\xdf\n", res.stderr


# ----------------------------------------------------------------------------- a diverged stage keeps nothing
class _DivergingTask:
    """Stage t's labels are t for pair "a"; ``nan_labels``: stage 1's refresh gives pair "b" NaN labels;
    ``nan_weights``: stage 1's training leaves NaN weights (after writing a snapshot, as a long stage does)."""

    checkpoint_kind = "toy"

    def __init__(self, *, nan_labels=False, nan_weights=False):
        self.nan_labels, self.nan_weights = nan_labels, nan_weights
        self.config = type("Config", (), {"lr": 0.25})()

    def new_model(self, stage):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stage)
            return torch.nn.Linear(1, 1)

    def model_config(self):
        return {"toy": 1}

    def make_pseudo_labels(self, model, stage, progress=None, parts=None):
        labels = {"a": torch.full((2,), float(stage)), "b": torch.full((2,), float(stage))}
        if self.nan_labels and stage == 1:
            labels["b"][1] = float("nan")
        return labels, {"weights": {"a": 1.0, "b": 1.0}, "stats": {}}

    def train_stage(self, model, labels, weights, stage, progress=None, snapshot=None):
        if self.nan_weights:
            snapshot.path.write_bytes(b"a snapshot of the stage")
            with torch.no_grad():
                model.weight.fill_(float("nan"))
        return {}


@pytest.mark.parametrize("kind, what", [
    ("nan_labels", r"its refreshed pseudo labels hold NaN or inf \(pair b\)"),
    ("nan_weights", r"its trained weights hold NaN or inf \(weight\)"),
])
def test_a_diverged_stage_is_named_and_leaves_only_the_earlier_stages_files(tmp_path, kind, what):
    from cyclereg.errors import ResultError
    from cyclereg.training.scheduler import StageScheduler

    s = StageScheduler(_DivergingTask(**{kind: True}), tmp_path)
    s.run_stage0()
    before = sorted(p.name for p in tmp_path.iterdir() if p.name != "log.jsonl")
    with pytest.raises(ResultError, match=f"^{tmp_path}: stage 1 diverged: {what}; nothing of the stage was kept "
                                          r".*: lower lr 0\.25 in run\.json and run the same command again$"):
        s.run(1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "log.jsonl") == before
    assert s.last_finished_stage() == 0


# ----------------------------------------------------------------------------- caches and inference tensors
def test_min_convolution_recomputes_a_float64_source_term_instead_of_refusing_it():
    """``src_ax2`` is a cache of ``alpha |x|^2``: one of another dtype is made again in float32, so the call
    gives the messages of no cache at all (the C search's own float32 check never sees it)."""
    g = torch.Generator().manual_seed(0)
    b, cs, cd = torch.rand(30, 16, generator=g), torch.randn(30, 16, 3, generator=g) * 0.1, \
        torch.randn(30, 12, 3, generator=g) * 0.1
    want = lbp.min_convolution(b, cs, cd, 10.0)
    got = lbp.min_convolution(b, cs, cd, 10.0, src_ax2=cloud_native.source_term(cs, 10.0).double())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float64: the torch path, which saves them
def test_adam_refine_of_inference_tensors_without_feature_standardisation(dtype):
    """Features made under ``torch.inference_mode()`` and used as they are (``normalize_features=False``): the
    refinement must copy them out of inference mode (autograd saves them); the same field as plain tensors."""
    from cyclereg.dense import instance
    from cyclereg.dense.instance import AdamConfig

    g = torch.Generator().manual_seed(0)
    ff, fm = torch.randn(2, 1, 4, 6, 7, 7, generator=g, dtype=dtype)
    d0 = torch.rand(1, 3, 12, 13, 14, generator=g, dtype=dtype) * 0.5 + 0.2
    cfg = AdamConfig(iterations=3, normalize_features=False)
    want = instance.adam_refine(ff, fm, d0, 2, cfg)
    with torch.inference_mode():
        got = instance.adam_refine(ff.clone(), fm.clone(), d0.clone(), 2, cfg)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_pair_without_orientation_is_noted_once_like_a_nifti_file(tmp_path, capsys):
    """A .hdr/.img pair with qform and sform codes 0 gets the one 'no orientation' note a .nii gets."""
    from cyclereg.volumeio import read_nifti

    img = nib.Nifti1Pair(np.zeros((4, 5, 6), np.float32), np.diag([2.0, 3.0, 4.0, 1.0]))
    img.set_qform(None, code=0)
    img.set_sform(None, code=0)
    nib.save(img, tmp_path / "v.img")
    capsys.readouterr()
    read_nifti(tmp_path / "v.img")
    read_nifti(tmp_path / "v.img")
    err = capsys.readouterr().err
    assert err.count("its header has no orientation (qform and sform codes 0)") == 1, err
    assert "v.img" in err


def test_hd95_measures_a_slightly_sheared_grid_in_world_mm():
    """A shear of 0.005 (``L = [[1, 0.005, 0], [0, 1, 0], [0, 0, 1]]``): two voxels a step (1, 1, 0) apart lie
    ``|L (1, 1, 0)| = sqrt(1.005^2 + 1)`` mm apart, not the ``sqrt(1 + 1 + 0.005^2)`` of the column lengths."""
    from cyclereg.metrics import hd95

    a = torch.zeros(4, 4, 4, dtype=torch.int64)
    b = torch.zeros(4, 4, 4, dtype=torch.int64)
    a[1, 1, 1] = 1
    b[2, 2, 1] = 1
    sheared = np.array([[1.0, 0.005, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert hd95(a, b, spacing=sheared)[1] == pytest.approx(math.sqrt(1.005 ** 2 + 1.0), rel=1e-9)
