"""Contracts found by a walk over large inputs (2026-12-08).

``register F.csv M.csv -o OUT`` fitted the thin-plate spline through the fixed cloud even when no output needed it
(no ``--query``, no ``--reference``): an ``N x N`` float64 solve whose result was dropped. With 20,000 fixed points
(``--model random``) it took 9.9 GB and about 55 s of a 70 s command whose registration took 12 s; with 50,000 the
command died after 1:51 min with torch's raw ``DefaultCPUAllocator: can't allocate memory`` traceback (20 GB asked
for) and wrote nothing. The spline is now fitted only for ``--query`` / ``--reference``.

Where the spline is needed (those outputs, and every re-centred LBP pass of a trained model), a fixed cloud whose
spline needs more memory than the device has (:func:`cyclereg.clouds.tps.fit_bytes`: three float64 matrices of
``(N + 4)^2`` entries, 60 GB for 50,000 points) is refused before the registration with one line naming the file.

Evaluating a spline (:meth:`ThinPlateSpline.__call__`) kept each piece's small result beside the freed kernel
pieces, which fragmented the heap: 200k points on 10k centres left 8.3 GB resident, and ``register --reference`` of
5,000 points on a 512x512x600 grid peaked at 9.4 GB. Without a graph the pieces now go into one result (0.3 GB,
the same values bit for bit).
"""

import subprocess
import sys
import textwrap

import torch

import pytest
from typer.testing import CliRunner

import cyclereg.api
import cyclereg.clouds.api as cloud_api
from cyclereg.clouds.pipeline import CloudRegistration
from cyclereg.clouds.tps import FIT_MATRICES, ThinPlateSpline, fit_bytes
from cyclereg_cli.main import app

runner = CliRunner()


def test_register_without_query_or_reference_fits_no_spline(pair_files, monkeypatch):
    """Displacements at the fixed points only: nothing densifies them, so no spline is fitted (the random
    network registers in a single pass, which fits none either)."""
    d, _ = pair_files

    def no_spline(*args, **kwargs):
        raise AssertionError("the spline was fitted although no output needs it")

    monkeypatch.setattr(ThinPlateSpline, "fit", staticmethod(no_spline))
    r = cyclereg.api.register(d / "f.csv", d / "m.csv", d / "out", model="random", verbose=False)
    assert "displacements.csv" in r.files


def test_register_with_a_query_fits_the_spline_once(pair_files, monkeypatch):
    d, _ = pair_files
    fits = []
    original = CloudRegistration.spline

    def counted(self):
        fits.append(1)
        return original(self)

    monkeypatch.setattr(CloudRegistration, "spline", counted)
    r = cyclereg.api.register(d / "f.csv", d / "m.csv", d / "out", model="random", query=d / "q.csv", verbose=False)
    assert "query_displacements.csv" in r.files and len(fits) == 1


def test_fit_bytes_counts_the_fits_matrices():
    assert fit_bytes(0) == FIT_MATRICES * 8 * 16
    assert fit_bytes(20_000) == FIT_MATRICES * 8 * 20_004 ** 2  # 9.6 GB: 9.9 GB peak measured


@pytest.mark.parametrize("args", [["--query", "q.csv"], ["--model", "recentred"]])
def test_a_spline_beyond_the_machines_memory_is_refused_in_one_line_before_the_registration(pair_files, monkeypatch,
                                                                                          args):
    """The 300-point pair on a machine of 1 MB: the spline (2.2 MB) is refused naming the fixed file, exit 2,
    before any registration, and nothing is written."""
    d, _ = pair_files
    if args[-1] == "recentred":  # a model with a re-centred pass fits the spline inside the registration
        config = cloud_api.CloudRegConfig(recentre_passes=1)
        real = cloud_api.load_cloud_model
        monkeypatch.setattr(cloud_api, "load_cloud_model",
                            lambda model, **kw: real("random", **{**kw, "config": config}))
        args = ["--model", "random"]
    monkeypatch.setattr(cloud_api, "memory_bytes", lambda device: 10 ** 6)
    monkeypatch.setattr(cloud_api, "register_clouds", lambda *a, **k: pytest.fail("registered"))
    res = runner.invoke(app, ["register", str(d / "f.csv"), str(d / "m.csv"), "-o", str(d / "out"),
                              *[str(d / a) if a.endswith(".csv") else a for a in args]])
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert "\n" not in line and str(d / "f.csv") in line and "300 fixed points" in line and "GB" in line
    assert "--max-points" in line and "GB of this machine" in line
    assert not (d / "out").exists()


def test_without_a_spline_a_small_machine_still_registers(pair_files, monkeypatch):
    d, _ = pair_files
    monkeypatch.setattr(cloud_api, "memory_bytes", lambda device: 10 ** 6)
    res = runner.invoke(app, ["register", str(d / "f.csv"), str(d / "m.csv"), "-o", str(d / "out")])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("kernel", ["r2logr", "r"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spline_values_without_a_graph_are_those_with_one(kernel, dtype):
    """The pieces written into one result hold the bits the graph-keeping path computes (several pieces)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.rand(700, 3, generator=g, dtype=torch.float64) * 2 - 1
    spline = ThinPlateSpline.fit(centres, torch.randn(700, 3, generator=g, dtype=torch.float64), regularisation=0.1,
                                 kernel=kernel)
    query = (torch.rand(5003, 3, generator=g, dtype=torch.float64) * 2.4 - 1.2).to(dtype)
    plain = spline(query)
    with_graph = spline(query.clone().requires_grad_(True))
    assert with_graph.requires_grad and plain.dtype == with_graph.dtype == dtype
    assert torch.equal(plain, with_graph.detach())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_spline_evaluation_keeps_no_memory_per_piece():
    """100k points on 2,000 centres (1,000 pieces of 4 MiB kernel): resident memory grew by 455 MiB before, now by
    about the 2.4 MB result."""
    code = textwrap.dedent("""
        import torch
        from cyclereg.clouds.tps import ThinPlateSpline
        def rss():
            return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) * 1024
        g = torch.Generator().manual_seed(0)
        c = torch.rand(2000, 3, generator=g, dtype=torch.float64)
        s = ThinPlateSpline.fit(c, torch.randn(2000, 3, generator=g, dtype=torch.float64), regularisation=0.1)
        q = torch.rand(100_000, 3, generator=g, dtype=torch.float64)
        s(q[:1000])
        before = rss()
        s(q)
        print(rss() - before)
    """)
    grown = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert grown < 200 * 2**20, f"{grown / 2**20:.0f} MiB kept"


TORCH_CPU_OOM = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 20000000000 bytes. Error code 12 (Cannot allocate memory)")


@pytest.mark.parametrize("error", [RuntimeError(TORCH_CPU_OOM), MemoryError("min-sum kernel: out of memory"),
                                   RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")])
def test_an_allocation_that_fails_is_one_line_exit_1(pair_files, monkeypatch, error):
    """torch's CPU allocator raises a RuntimeError (the 512x512x600 dense pair, the keypoints of that volume
    without a mask, a 50,000-point spline all ended in its traceback): one line, exit 1, nothing written."""
    d, _ = pair_files

    def no_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(cloud_api, "register_clouds", no_memory)
    res = runner.invoke(app, ["register", str(d / "f.csv"), str(d / "m.csv"), "-o", str(d / "out")])
    assert res.exit_code == 1, res.output
    line = res.output.strip()
    assert "\n" not in line and line.startswith("cyclereg: error: out of memory") and "smaller inputs" in line
    assert ("20.0 GB" in line) == ("20000000000" in str(error))
    assert not (d / "out").exists()


def test_another_runtime_error_is_not_called_out_of_memory(pair_files, monkeypatch):
    d, _ = pair_files

    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(cloud_api, "register_clouds", broken)
    res = runner.invoke(app, ["register", str(d / "f.csv"), str(d / "m.csv"), "-o", str(d / "out")])
    assert res.exit_code != 0 and isinstance(res.exception, RuntimeError) and "out of memory" not in res.output


# ----------------------------------------------------------------------------- step lines of long registrations
def _volume_pair(folder):
    """Two smooth 24x20x28 volumes of 2 mm on one grid, the second shifted by one voxel."""
    import numpy as np
    from scipy.ndimage import gaussian_filter, shift

    from cyclereg.volumeio import write_nifti

    data = gaussian_filter(np.random.default_rng(0).normal(size=(24, 20, 28)), 2).astype(np.float32) * 100
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    write_nifti(folder / "f.nii.gz", data, affine)
    write_nifti(folder / "m.nii.gz", shift(data, (1, 0, 0)).astype(np.float32), affine)


def _step_names(err: str) -> list[str]:
    return [line.split("done ", 1)[1].rsplit(" ", 2)[0] for line in err.splitlines() if line.startswith("done ")]


def test_a_dense_registration_says_its_steps_on_stderr(tmp_path, capfd):
    """register F.nii.gz M.nii.gz printed nothing until its result (248 s silent for a 512x512x141 pair): now a
    line per step on stderr, with the grid and the device; stdout keeps the one result line; verbose=False is
    silent."""
    _volume_pair(tmp_path)
    r = cyclereg.api.register(tmp_path / "f.nii.gz", tmp_path / "m.nii.gz", tmp_path / "out", model="random",
                              warps=1, adam=False, device="cpu")
    out, err = capfd.readouterr()
    assert out == "" and "registered in" in str(r)
    assert _step_names(err) == ["read scans", "dense registration, 24x20x28 voxels (cpu)", "warped scan, Jacobian",
                                "write"], err
    cyclereg.api.register(tmp_path / "f.nii.gz", tmp_path / "m.nii.gz", tmp_path / "quiet", model="random", warps=1,
                          adam=False, device="cpu", verbose=False)
    assert capfd.readouterr() == ("", "")


def test_clouds_with_a_reference_grid_say_their_steps_and_clouds_alone_do_not(pair_files, capfd):
    """The field on a reference grid can take minutes (144 s on 512x512x600): its steps are said; a registration
    of the clouds alone takes seconds and prints nothing (its result line is the CLI's)."""
    import numpy as np

    from cyclereg.volumeio import write_nifti

    d, pair = pair_files
    lo = pair.fixed_mm.min(0).values.double() - 4
    shape = tuple(int(v) for v in ((pair.fixed_mm.max(0).values.double() + 4 - lo) / 4).ceil().long().flip(0) + 1)
    affine = np.array([[0, 0, 4.0, lo[0]], [0, 4.0, 0, lo[1]], [4.0, 0, 0, lo[2]], [0, 0, 0, 1]])  # i = z, k = x
    write_nifti(d / "ref.nii.gz", np.zeros(shape, np.float32), affine)
    cyclereg.api.register(d / "f.csv", d / "m.csv", d / "plain", model="random")
    assert capfd.readouterr() == ("", "")
    cyclereg.api.register(d / "f.csv", d / "m.csv", d / "dense", model="random", reference=d / "ref.nii.gz")
    out, err = capfd.readouterr()
    n, m = pair.fixed_mm.shape[0], pair.moving_mm.shape[0]
    assert out == "" and _step_names(err) == [f"cloud registration, {n} to {m} points (cpu)",
                                              f"dense field on the {'x'.join(map(str, shape))} grid", "write"], err
    cyclereg.api.register(d / "f.csv", d / "m.csv", d / "quiet", model="random", reference=d / "ref.nii.gz",
                          verbose=False)
    assert capfd.readouterr() == ("", "")


# ----------------------------------------------------------------------------- the device whose memory is checked
def test_training_and_evaluation_check_the_memory_of_the_device_they_run_on(tmp_path, monkeypatch):
    """pretrain-random and evaluate ask for the memory of the device they were given (the spline is fitted there),
    not of the CPU the points were read to; an unknown name (``auto``) gives no figure instead of an error."""
    from conftest import write_two_pair_dataset

    import cyclereg.training.api as training_api
    from cyclereg.device import memory_bytes
    from cyclereg.errors import InputError

    ds = write_two_pair_dataset(tmp_path)
    asked = []

    def small(device):
        asked.append(torch.device(device).type)
        return 10 ** 6

    monkeypatch.setattr(cloud_api, "memory_bytes", small)
    monkeypatch.setattr(cloud_api, "resolve_device", lambda device="auto": torch.device("meta"))
    monkeypatch.setattr(training_api, "resolve_device", lambda device="auto": torch.device("meta"))
    with pytest.raises(InputError, match="300 fixed points: the thin-plate spline"):
        training_api.pretrain_random(ds, tmp_path / "run", folds="1")
    with pytest.raises(InputError, match="300 fixed points: the thin-plate spline"):
        cyclereg.api.evaluate(ds, tmp_path / "r.json", model="random")
    assert asked == ["meta", "meta"] and not (tmp_path / "run").exists() and not (tmp_path / "r.json").exists()
    assert memory_bytes("auto") is None and memory_bytes("cpu") > 0
