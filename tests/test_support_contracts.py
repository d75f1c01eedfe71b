"""Contracts of the support modules that a mutation audit found open.

``cyclereg.errors`` (input checks, one-line messages), ``cyclereg.device`` (``--device`` resolution,
``/proc/cpuinfo``), ``cyclereg.interrupts`` (SIGTERM as an orderly exit), ``cyclereg.console`` (tables and
notes) and the compile-on-first-use C kernels (``cyclereg.native`` and the ``native`` modules of
``cyclereg.clouds`` and ``cyclereg.dense``): each test pins an answer derived by hand on tiny inputs (files
in ``tmp_path``, a fake ``/proc/cpuinfo``, a fake compiler, monkeypatched CUDA availability) and fails when
the code it guards is changed in a way the rest of the suite did not notice.
"""

from __future__ import annotations

import pytest
import torch

from cyclereg.errors import InputError


# ----------------------------------------------------------------------------- device
def test_resolve_device_passes_a_device_through_and_reads_names_in_any_case():
    from cyclereg.device import resolve_device

    given = torch.device("cuda", 3)  # a device object is taken as it is (not checked against this machine)
    assert resolve_device(given) is given
    assert resolve_device("CPU") == torch.device("cpu")
    assert resolve_device("Auto") in (torch.device("cpu"), torch.device("cuda"))


def test_auto_follows_cuda_availability_and_cuda_n_is_refused_without_cuda(monkeypatch):
    from cyclereg import device

    monkeypatch.setattr(device.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device.torch.cuda, "device_count", lambda: 2)
    assert device.resolve_device("auto") == torch.device("cuda")
    assert device.resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(device.torch.cuda, "is_available", lambda: False)
    assert device.resolve_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:0", "CUDA:1"):
        with pytest.raises(InputError, match="CUDA is not available"):
            device.resolve_device(name)


@pytest.mark.parametrize("name", ["tpu", "mps", "gpu", "cpu:0x"])
def test_an_unknown_device_is_an_input_error_naming_the_choices(monkeypatch, name):
    from cyclereg import device

    monkeypatch.setattr(device.torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match=f"--device {name}: expected auto, cpu or cuda"):
        device.resolve_device(name)


def _fake_cpuinfo(monkeypatch, tmp_path, text):
    from cyclereg import device

    path = tmp_path / "cpuinfo"
    path.write_text(text)
    real = device.Path
    monkeypatch.setattr(device, "Path", lambda p: path if str(p) == "/proc/cpuinfo" else real(p))


def test_cpuinfo_fields_are_whole_field_names_with_stripped_values(monkeypatch, tmp_path):
    from cyclereg import device

    _fake_cpuinfo(monkeypatch, tmp_path, "processor\t: 0\nvmx flags\t: ept vpid\nflags\t\t: fpu sse avx512_bf16  \n"
                                         "model name\t:  Test CPU @ 2.0GHz  \nmodel name\t: second\n")
    assert device.cpuinfo_field("flags") == "fpu sse avx512_bf16"
    assert device.cpuinfo_field("model name") == "Test CPU @ 2.0GHz"
    assert device.cpuinfo_field("bogomips") is None
    assert device.cpu_model() == "Test CPU @ 2.0GHz"
    assert device.cpu_has_bf16_units()


def test_bf16_units_need_one_of_the_two_exact_flags(monkeypatch, tmp_path):
    from cyclereg import device

    _fake_cpuinfo(monkeypatch, tmp_path, "flags\t: fpu avx512f bf16_like_but_not amx_tile\n")
    assert not device.cpu_has_bf16_units()


def test_cpu_model_falls_back_to_platform_without_a_model_name(monkeypatch, tmp_path):
    from cyclereg import device

    _fake_cpuinfo(monkeypatch, tmp_path, "processor\t: 0\n")
    monkeypatch.setattr(device.platform, "processor", lambda: "armv8l")
    assert device.cpu_model() == "armv8l"
    monkeypatch.setattr(device.platform, "processor", lambda: "")
    assert device.cpu_model() == "unknown"


def test_provenance_names_a_gpu_only_for_a_cuda_device(monkeypatch):
    from cyclereg import device

    monkeypatch.setattr(device.torch.cuda, "get_device_name", lambda d: "Fake GPU")
    assert "gpu" not in device.provenance(torch.device("cpu"))["machine"]
    assert "gpu" not in device.provenance(None)["machine"]
    assert device.provenance(torch.device("cuda", 0))["machine"]["gpu"] == "Fake GPU"



def test_provenance_holds_plain_strings():
    """A record is plain JSON data: torch's version is a ``TorchVersion`` (a ``str`` subclass) until converted."""
    from cyclereg import device

    def leaves(x):
        return [v for y in x.values() for v in leaves(y)] if isinstance(x, dict) else [x]

    assert {type(v) for v in leaves(device.provenance(torch.device("cpu")))} == {str}
    assert device.provenance()["machine"]["torch"] == torch.__version__

# ----------------------------------------------------------------------------- errors
def test_an_input_error_is_one_line_led_by_its_file():
    from pathlib import Path

    err = InputError("bad\n  header,\tcolumns  ", "/data/f.csv")
    assert str(err) == "/data/f.csv: bad header, columns"
    assert err.path == Path("/data/f.csv") and err.message.startswith("bad\n")
    assert str(InputError("no\nfile")) == "no file" and InputError("x").path is None


def test_one_non_finite_value_is_a_result_error_counting_it():
    from cyclereg.errors import ResultError, require_finite_result

    require_finite_result(torch.zeros(4), "displacements", "f.csv")
    with pytest.raises(ResultError, match=r"f.csv: displacements hold NaN or inf \(1 of 4 values\); nothing written"):
        require_finite_result(torch.tensor([0.0, float("inf"), 1.0, 2.0]), "displacements", "f.csv")


def test_a_blank_path_in_a_list_is_refused_naming_its_argument():
    from cyclereg.errors import refuse_empty_paths

    refuse_empty_paths({"inputs": ["a.csv", "b.csv"], "out": None, "model": "."})
    with pytest.raises(InputError, match="^inputs: an empty path"):
        refuse_empty_paths({"out": "x", "inputs": ("a.csv", "  ")})


def test_the_random_hint_is_for_a_bare_word_only(tmp_path):
    from cyclereg.errors import require_checkpoint_file

    with pytest.raises(InputError, match="give the model as 'random'"):
        require_checkpoint_file("randon")
    for missing in (tmp_path / "models" / "copd", tmp_path / "model.pt"):
        with pytest.raises(InputError, match="file does not exist") as info:
            require_checkpoint_file(missing)
        assert "untrained" not in str(info.value)


def test_a_folder_is_neither_an_input_file_nor_an_output_file(tmp_path):
    from cyclereg.errors import require_file, require_output_file

    with pytest.raises(InputError, match="is not a regular file"):
        require_file(tmp_path)
    with pytest.raises(InputError, match="is a folder; an output file is needed"):
        require_output_file(tmp_path)


def test_an_output_below_a_file_is_refused_naming_the_file(tmp_path):
    from cyclereg.errors import require_output_dir, require_output_file

    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(InputError, match=r"cannot make its folder \(.*a.txt is a file\)"):
        require_output_file(tmp_path / "a.txt" / "sub" / "out.csv")
    with pytest.raises(InputError, match=r"cannot make this folder \(.*a.txt is a file\)"):
        require_output_dir(tmp_path / "a.txt" / "sub")


def test_an_unwritable_ancestor_is_refused_before_any_work(monkeypatch, tmp_path):
    import os

    from cyclereg import errors

    asked = []
    # as a user without write permission there (root may write anywhere, so os.access is faked)
    monkeypatch.setattr(errors.os, "access", lambda p, mode: asked.append(mode) or not mode & os.W_OK)
    with pytest.raises(InputError, match="permission denied"):
        errors.require_output_file(tmp_path / "new" / "out.csv")
    assert all(mode & os.W_OK and mode & os.X_OK for mode in asked)


def test_an_output_folder_named_like_a_file_is_refused_only_when_new(tmp_path):
    from cyclereg.errors import require_output_dir

    for name in ("notes.txt", "out.nii.gz", "model.PT", "report.json"):
        with pytest.raises(InputError, match=r"names a file \("):
            require_output_dir(tmp_path / name)
    (tmp_path / "old.nii.gz").mkdir()
    assert require_output_dir(tmp_path / "old.nii.gz") == tmp_path / "old.nii.gz"
    assert require_output_dir(tmp_path / ".txt") == tmp_path / ".txt"  # a hidden folder, not a suffix


def _run_dir(tmp_path):
    import json

    run = tmp_path / "run"
    (run / "fold0").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"kind": "clouds", "config": {}}))
    return run


def test_a_run_directory_is_found_from_its_subfolders_and_needs_kind_and_config(tmp_path):
    import json

    from cyclereg.errors import refuse_output_in_run, run_dir_holding

    run = _run_dir(tmp_path)
    assert run_dir_holding(run / "fold0" / "deeper") == run
    with pytest.raises(InputError, match="--labels-out: this folder is in the run directory"):
        refuse_output_in_run(run / "fold0", "--labels-out")
    other = tmp_path / "other"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"kind": "clouds"}))
    assert run_dir_holding(other) is None
    refuse_output_in_run(other, "--out")


def test_an_output_among_a_runs_own_files_is_refused_but_a_report_beside_them_is_not(tmp_path):
    from cyclereg.errors import require_separate_output

    run = _run_dir(tmp_path)
    for own in (run / "fold0" / "x.csv", run / "stage3.pt", run / "train.jsonl", run / "run.json"):
        with pytest.raises(InputError, match="would be one of the files of the model"):
            require_separate_output(own, "--out", run_dirs={"the model": run})
    require_separate_output(run / "report.csv", "--out", run_dirs={"the model": run})


def test_an_output_that_is_an_input_through_a_link_is_refused(tmp_path):
    import os

    from cyclereg.errors import require_separate_output

    src = tmp_path / "in.csv"
    src.write_text("1,2,3\n")
    (tmp_path / "soft.csv").symlink_to(src)
    os.link(src, tmp_path / "hard.csv")
    for out in ("soft.csv", "hard.csv"):
        with pytest.raises(InputError, match="--out: this is also the fixed points"):
            require_separate_output(tmp_path / out, "--out", files={"the fixed points": src, "the model": None})
    require_separate_output(tmp_path / "new.csv", "--out", files={"the fixed points": src})


def test_counts_seeds_and_switches_take_their_bounds_and_nothing_else():
    from cyclereg.errors import MAX_SEED, finite_number, require_count, require_seed, require_switches

    assert require_count("--jobs", 2, 2) == 2
    with pytest.raises(InputError, match="--jobs 1: need 2 or more"):
        require_count("--jobs", 1, 2)
    assert require_seed(0) == 0 and require_seed(MAX_SEED) == MAX_SEED
    for bad in (-1, MAX_SEED + 1, True, 1.0):
        with pytest.raises(InputError, match="--seed"):
            require_seed(bad)
    # a random network's seed: up to the seed of the last run seed's stage-1 network, one more refused
    from cyclereg.errors import MAX_MODEL_SEED
    from cyclereg.training.scheduler import initial_network_seed

    assert MAX_MODEL_SEED == initial_network_seed(MAX_SEED, 1) == max(initial_network_seed(MAX_SEED, t) for t in (0, 1, 5))
    assert require_seed(MAX_MODEL_SEED, largest=MAX_MODEL_SEED) == MAX_MODEL_SEED
    with pytest.raises(InputError, match=f"--seed {MAX_MODEL_SEED + 1}: need a whole number from 0 to {MAX_MODEL_SEED}"):
        require_seed(MAX_MODEL_SEED + 1, largest=MAX_MODEL_SEED)
    require_switches({"--adam": True, "--cpu": False, "--x": None})
    for bad in (1, 0, "no"):
        with pytest.raises(InputError, match="--adam .*expected True or False"):
            require_switches({"--adam": bad})
    assert not finite_number(True) and not finite_number(float("nan")) and finite_number(0)


# ----------------------------------------------------------------------------- interrupts
def test_a_sigterm_inside_an_import_is_sent_again_later_by_a_daemon_timer(monkeypatch):
    import os
    import signal
    import types

    from cyclereg import interrupts

    timers = []

    class _Timer:
        def __init__(self, delay, fn, args):
            self.delay, self.fn, self.args, self.daemon, self.started = delay, fn, args, False, False
            timers.append(self)

        def start(self):
            self.started = True

    monkeypatch.setattr(interrupts.threading, "Timer", _Timer)
    outer = types.SimpleNamespace(f_code=types.SimpleNamespace(co_filename="<frozen importlib._bootstrap>"), f_back=None)
    inner = types.SimpleNamespace(f_code=types.SimpleNamespace(co_filename="/lib/numpy/__init__.py"), f_back=outer)
    assert interrupts.sigterm_exit(signal.SIGTERM, inner) is None  # no exit inside the import
    (t,) = timers
    assert t.started and t.daemon and t.delay == interrupts.IMPORT_RETRY_S
    assert t.fn is os.kill and t.args == (os.getpid(), signal.SIGTERM)


def test_the_handler_is_installed_on_the_main_thread_only_and_the_previous_one_returned():
    import signal
    import threading

    from cyclereg.interrupts import exit_on_sigterm, sigterm_exit

    def mine(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, mine)
    try:
        assert exit_on_sigterm() is mine and signal.getsignal(signal.SIGTERM) is sigterm_exit
        signal.signal(signal.SIGTERM, mine)
        got = []
        worker = threading.Thread(target=lambda: got.append(exit_on_sigterm()))
        worker.start()
        worker.join()
        assert got == [None] and signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)


# ----------------------------------------------------------------------------- console
def _table(*cells, header="error [mm]", expand=False):
    from rich.table import Table

    table = Table(expand=expand)
    table.add_column(header)
    for cell in cells:
        table.add_row(cell)
    return table


def test_a_table_in_a_narrow_terminal_folds_cells_and_keeps_bracketed_headers():
    import io

    from rich.console import Console

    from cyclereg.console import print_table

    console = Console(file=io.StringIO(), width=20, force_terminal=True, color_system=None)
    word = "abcdefghijklmnopqrstuvwxyz0123456789"
    print_table(console, _table(word))
    text = console.file.getvalue()
    assert "…" not in text and "[mm]" in text
    assert word in "".join(line.strip("│ ┃") for line in text.splitlines())


def test_a_table_off_a_terminal_is_printed_whole_up_to_the_cap_and_the_width_restored():
    import io

    from rich.console import Console

    from cyclereg.console import MAX_LOG_WIDTH, print_table

    console = Console(file=io.StringIO(), width=80)
    assert not console.is_terminal
    print_table(console, _table("x" * 150))
    assert console.width == 80 and "x" * 150 in console.file.getvalue()
    console = Console(file=io.StringIO(), width=80)
    print_table(console, _table("y" * 1000))
    assert max(len(line) for line in console.file.getvalue().splitlines()) == MAX_LOG_WIDTH
    console = Console(file=io.StringIO(), width=80)
    print_table(console, _table("z", expand=True))  # never narrower than the console
    assert max(len(line) for line in console.file.getvalue().splitlines()) == 80


def test_a_note_is_one_literal_line_on_stderr_and_nothing_when_quiet(capsys):
    from cyclereg.console import print_note

    text = "see [bold]x[/bold] in [mm] " + "long " * 60
    print_note(text)
    out, err = capsys.readouterr()
    assert out == "" and err == f"note: {text}\n"
    print_note("hidden", quiet=True)
    assert capsys.readouterr() == ("", "")


def test_count_is_singular_for_one_only():
    from cyclereg.console import count

    assert [count(n, "pair") for n in (0, 1, 2)] == ["0 pairs", "1 pair", "2 pairs"]


# ----------------------------------------------------------------------------- native: build and cache
def test_the_cache_folder_follows_cyclereg_then_xdg_then_home(monkeypatch, tmp_path):
    from pathlib import Path

    from cyclereg import native

    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert native.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(native.CACHE_ENV)
    assert native.cache_dir() == tmp_path / "xdg" / "cyclereg"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert native.cache_dir() == Path(tmp_path / "home" / ".cache" / "cyclereg")


def test_native_code_is_off_only_for_zero(monkeypatch):
    from cyclereg import native

    monkeypatch.delenv(native.DISABLE_ENV, raising=False)
    assert not native.disabled()
    for value, off in (("0", True), ("1", False), ("yes", False)):
        monkeypatch.setenv(native.DISABLE_ENV, value)
        assert native.disabled() is off


_FAKE_CC = """#!/bin/sh
echo "$@" >> "$FAKE_CC_LOG"
case "$*" in *-fopenmp*) if [ -n "$FAKE_CC_NO_OPENMP" ]; then echo "fake-cc: error: no OpenMP" >&2; exit 1; fi;; esac
if [ -n "$FAKE_CC_BROKEN" ]; then echo "fake-cc: error: broken" >&2; exit 1; fi
while [ $# -gt 0 ]; do if [ "$1" = "-o" ]; then echo built > "$2"; fi; shift; done
"""


@pytest.fixture
def fake_cc(monkeypatch, tmp_path):
    """``(cc, log, source)``: a fake compiler script (``$CC``) that writes a dummy library and logs its
    arguments (one line a call), a cache in ``tmp_path / "cache"`` and a C source."""
    from cyclereg import native

    cc = tmp_path / "fake-cc"
    cc.write_text(_FAKE_CC)
    cc.chmod(0o755)
    log = tmp_path / "cc.log"
    log.write_text("")
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("FAKE_CC_LOG", str(log))
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(native, "cpu_identity", lambda: "cpu-A")
    source = tmp_path / "k.c"
    source.write_text("int f(void) { return 1; }\n")
    return cc, log, source


def test_cc_is_the_compiler_and_gets_the_common_and_first_flags(fake_cc):
    from cyclereg import native

    cc, log, source = fake_cc
    assert native.compiler() == str(cc)
    out = native.build(source, "k")
    (args,) = log.read_text().splitlines()
    assert args.split() == [*native.COMMON_FLAGS, *native.FLAG_SETS[0], str(source), "-o", args.split()[-2], "-lm"]
    assert out.parent == native.cache_dir() / "native" and out.name.startswith("k-") and out.read_text() == "built\n"


def test_a_library_is_built_once_per_source_compiler_cpu_and_flags(fake_cc, monkeypatch, tmp_path):
    from cyclereg import native

    cc, log, source = fake_cc
    first = native.build(source, "k")
    assert native.build(source, "k") == first and len(log.read_text().splitlines()) == 1
    source.write_text("int f(void) { return 2; }\n")
    other_source = native.build(source, "k")
    monkeypatch.setattr(native, "cpu_identity", lambda: "cpu-B")
    other_cpu = native.build(source, "k")
    cc2 = tmp_path / "fake-cc2"
    cc2.write_text(cc.read_text())
    cc2.chmod(0o755)
    monkeypatch.setenv("CC", str(cc2))
    other_cc = native.build(source, "k")
    assert len({first, other_source, other_cpu, other_cc}) == 4 and len(log.read_text().splitlines()) == 4


def test_a_library_built_without_openmp_is_not_taken_once_openmp_works(fake_cc, monkeypatch):
    from cyclereg import native

    _, log, source = fake_cc
    monkeypatch.setenv("FAKE_CC_NO_OPENMP", "1")
    fallback = native.build(source, "k")
    assert "-fopenmp" not in log.read_text().splitlines()[-1]
    monkeypatch.delenv("FAKE_CC_NO_OPENMP")
    assert native.build(source, "k") != fallback and "-fopenmp" in log.read_text().splitlines()[-1]


def test_a_failing_compiler_is_a_runtime_error_naming_its_message_and_leaves_nothing(fake_cc, monkeypatch):
    from cyclereg import native

    _, log, source = fake_cc
    monkeypatch.setenv("FAKE_CC_BROKEN", "1")
    with pytest.raises(RuntimeError, match="failed: fake-cc: error: broken"):
        native.build(source, "k")
    assert len(log.read_text().splitlines()) == len(native.FLAG_SETS)
    assert list((native.cache_dir() / "native").iterdir()) == []


def _library(monkeypatch, tmp_path, check=True, fail=None):
    """A :class:`NativeLibrary` whose build is counted and whose ``ctypes.CDLL`` is faked."""
    import ctypes

    from cyclereg import native

    calls = []

    def build():
        calls.append(1)
        if fail is not None:
            raise fail
        return tmp_path / "lib.so"

    monkeypatch.setattr(ctypes, "CDLL", lambda path: ("lib", path))
    monkeypatch.delenv(native.DISABLE_ENV, raising=False)
    lib = native.NativeLibrary(tmp_path / "k.c", "k", bind=lambda cdll: ("kernel", cdll), check=lambda fn: check,
                               mismatch="it disagrees")
    monkeypatch.setattr(lib, "build", build)
    return lib, calls


def test_a_kernel_that_fails_its_check_is_never_used_nor_rebuilt(monkeypatch, tmp_path):
    lib, calls = _library(monkeypatch, tmp_path, check=False)
    assert lib.kernel() is None and lib.kernel() is None and len(calls) == 1
    assert lib.reason() == "it disagrees: the torch path runs"
    lib.reset()
    assert lib.reason() == "it disagrees: the torch path runs" and len(calls) == 2


def test_a_build_error_is_a_reason_not_an_exception(monkeypatch, tmp_path):
    lib, calls = _library(monkeypatch, tmp_path, fail=RuntimeError("cc failed: boom"))
    assert lib.kernel() is None and lib.kernel() is None and len(calls) == 1
    assert lib.reason() == "could not be built: cc failed: boom: the torch path runs"


def test_a_loaded_kernel_is_off_while_disabled_and_reset_forgets_it(monkeypatch, tmp_path):
    from cyclereg import native

    lib, calls = _library(monkeypatch, tmp_path)
    assert lib.kernel() == ("kernel", ("lib", str(tmp_path / "lib.so")))
    assert lib.reason().startswith(native.IN_USE) and "torch path runs" not in lib.reason()
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    assert lib.kernel() is None and lib.reason().startswith("disabled by")
    monkeypatch.delenv(native.DISABLE_ENV)
    lib.reset()
    assert lib._reason == "not loaded yet" and lib._kernel is None
    assert lib.kernel() is not None and len(calls) == 2


# ----------------------------------------------------------------------------- native: the kernels' checks
def test_prune_first_is_the_fraction_from_prune_from_labels_and_zero_otherwise():
    from cyclereg.clouds.native import prune_first

    assert prune_first(16, 16, 0.25) == 4 and prune_first(15, 16, 0.25) == 0
    assert prune_first(16, None, 0.25) == 0
    assert prune_first(3, 1, 0.2) == 0  # int(0.6) = 0 labels: one full pass
    assert prune_first(8, 1, 1.0) == 0  # all labels in the first pass: one full pass


def test_the_fused_sweeps_take_float32_cpu_coordinates_without_gradient_and_at_most_2_16_labels(monkeypatch):
    from cyclereg.clouds import native

    monkeypatch.setattr(native, "usable", lambda belief: True)
    monkeypatch.setattr(native.SWEEPS, "kernel", lambda: object())
    k = native.SWEEP_MAX_LABELS
    assert native.sweeps_usable(torch.zeros(1, k), torch.zeros(1, k, 3))
    assert not native.sweeps_usable(torch.zeros(1, k + 1), torch.zeros(1, k + 1, 3))
    assert not native.sweeps_usable(torch.zeros(2, 4), torch.zeros(2, 4, 3, requires_grad=True))
    assert not native.sweeps_usable(torch.zeros(2, 4), torch.zeros(2, 4, 3, dtype=torch.float64))


def test_the_search_kernel_refuses_tensors_that_do_not_fit():
    from cyclereg.clouds.native import _call

    def never(*args):
        raise AssertionError("the kernel must not be called")

    belief = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="do not match"):
        _call(never, belief, torch.zeros(2, 5, 3), torch.zeros(2, 3, 3), 1.0, 0)
    with pytest.raises(ValueError, match="do not match"):
        _call(never, belief, torch.zeros(2, 4, 3), torch.zeros(3, 3, 3), 1.0, 0)


@pytest.mark.parametrize("wrong", ["pair", "flat", "pruned"])
def test_the_search_check_rejects_a_kernel_wrong_in_one_case_only(monkeypatch, wrong):
    """A kernel that is right except for its pairwise terms, or only for flat beliefs, or only in the
    pruned search, fails the self-check."""
    from conftest import require_kernel
    from cyclereg.clouds import native

    fn = require_kernel(native)
    real = native._call

    def off(fn, belief, cand_src, cand_dst, alpha, first, *args, **kwargs):
        arg, pair = real(fn, belief, cand_src, cand_dst, alpha, first, *args, **kwargs)
        if wrong == "pair":
            pair = pair + 1e-3
        elif (wrong == "flat" and float(belief.max()) < 1e-3) or (wrong == "pruned" and first > 0):
            arg = (arg + 1) % cand_src.shape[1]
        return arg, pair

    assert native._self_check(fn)
    monkeypatch.setattr(native, "_call", off)
    assert not native._self_check(fn)


@pytest.mark.parametrize("wrong", ["beliefs", "gradient"])
def test_the_sweeps_check_rejects_wrong_beliefs_or_a_wrong_gradient(monkeypatch, wrong):
    from cyclereg.clouds import native

    fns = native.SWEEPS.kernel()
    if fns is None:
        pytest.skip(f"no fused min-sum kernel here: {native.SWEEPS.reason()}")
    real = native._sweeps

    def off(fns, unary, *args):
        got = real(fns, unary, *args)
        if wrong == "beliefs":
            return got + 1e-4
        return got + 0.01 * got.detach() * (unary - unary.detach())  # the same values, another gradient

    assert native._check_sweeps(fns)
    monkeypatch.setattr(native, "_sweeps", off)
    assert not native._check_sweeps(fns)


@pytest.mark.parametrize("wrong", ["value", "gradient", "border"])
def test_the_warp_check_rejects_a_kernel_off_in_value_gradient_or_past_the_border(monkeypatch, wrong):
    from conftest import require_kernel
    from cyclereg.dense import native

    k = require_kernel(native)
    real = native._WarpMSE

    class Off:
        @staticmethod
        def apply(disp, mov_cl, fix_cl, kernel):
            got = real.apply(disp, mov_cl, fix_cl, kernel)
            if wrong == "value":
                return got * 1.001
            if wrong == "gradient":
                return got + ((disp - disp.detach()) * got.detach()).sum()
            # only where displacements reach past the border (more than 5 voxels in a 6 x 7 x 9 grid)
            return got * 1.001 if float(disp.detach().abs().max()) > 5 else got

    assert native._self_check(k)
    monkeypatch.setattr(native, "_WarpMSE", Off)
    assert not native._self_check(k)


def test_the_warp_data_term_refuses_a_field_that_does_not_fit_before_running(monkeypatch):
    from cyclereg.dense import native

    monkeypatch.setattr(native, "kernel", lambda: pytest.fail("the kernel must not be asked for"))
    feat = torch.zeros(4, 5, 6, 2)
    for disp, fix in ((torch.zeros(1, 3, 4, 5, 7), feat), (torch.zeros(1, 3, 4, 5, 6, dtype=torch.float64), feat),
                      (torch.zeros(1, 3, 4, 5, 6), torch.zeros(4, 5, 6, 3))):
        with pytest.raises(ValueError, match="does not fit features"):
            native.warped_mse(fix, feat, disp)


def test_the_warp_data_term_scales_its_gradient_by_the_upstream_one():
    """A weighted data term ``w * warped_mse``: its gradient is ``w`` times the unweighted one (the
    self-check only differentiates the bare term, whose upstream gradient is 1)."""
    from conftest import require_kernel
    from cyclereg.dense import native

    require_kernel(native)
    gen = torch.Generator().manual_seed(3)
    fix, mov = torch.randn(2, 1, 2, 4, 5, 6, generator=gen)
    disp = (torch.randn(1, 3, 4, 5, 6, generator=gen) * 0.7).requires_grad_(True)
    fix_cl, mov_cl = native.channels_last(fix), native.channels_last(mov)
    (g1,) = torch.autograd.grad(native.warped_mse(fix_cl, mov_cl, disp), disp)
    (g25,) = torch.autograd.grad(2.5 * native.warped_mse(fix_cl, mov_cl, disp), disp)
    assert g1.abs().max() > 0
    torch.testing.assert_close(g25, 2.5 * g1)


# ----------------------------------------------------------------------------- bugs the audit found (open)
@pytest.mark.parametrize("name", ["cuda:abc", "cudax", "cuda:-1"])
def test_a_malformed_cuda_device_is_an_input_error_on_a_cuda_machine(monkeypatch, name):
    from cyclereg import device

    monkeypatch.setattr(device.torch.cuda, "is_available", lambda: True)
    with pytest.raises(InputError, match=f"--device {name}: expected auto, cpu or cuda \\(or cuda:N, N a GPU number\\)"):
        device.resolve_device(name)  # it escaped as torch's RuntimeError: a traceback and exit 1


def test_a_cuda_index_past_the_machines_gpus_is_an_input_error(monkeypatch):
    from cyclereg import device

    monkeypatch.setattr(device.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device.torch.cuda, "device_count", lambda: 1)
    assert device.resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(InputError, match=r"--device cuda:7: this machine has 1 CUDA device \(cuda:0 .. cuda:0\)"):
        device.resolve_device("cuda:7")  # accepted: CUDA's 'invalid device ordinal' came later, mid-run
