"""Error types. :class:`InputError` is what bad user input raises; the CLI turns it into
one line on stderr and exit code 2."""

from __future__ import annotations

import errno
import json
import math
import numbers
import os
import stat
from pathlib import Path


class InputError(ValueError):
    """Bad user input (missing/unreadable file, wrong shape, NaN, empty cloud, ...).

    ``str(err)`` is a single line that names the offending file when there is one.
    """

    def __init__(self, message: str, path: str | Path | None = None):
        self.message = message
        self.path = None if path is None else Path(path)
        text = message if path is None else f"{path}: {message}"
        super().__init__(" ".join(text.split()))


class WorkerError(RuntimeError):
    """A worker process ended without a result (killed by the OS, a crash in native code).
    ``str(err)`` is a single line naming the job; the CLI exits with code 1."""


class ResultError(RuntimeError):
    """A computation gave an unusable result (NaN or inf displacements) from inputs that passed their
    checks; nothing was written. ``str(err)`` is a single line; the CLI exits with code 1."""


def require_finite_result(values, what: str, source: str | Path) -> None:
    """:class:`ResultError` unless the tensor ``values`` is all finite: "``source``: ``what`` hold NaN
    or inf ...; nothing written" (``source``: the input the result is of, e.g. the fixed file)."""
    bad = int((~values.isfinite()).sum())
    if bad:
        raise ResultError(f"{source}: {what} hold NaN or inf ({bad} of {values.numel()} values); nothing written")


EMPTY_PATH = "an empty path (an unset shell variable?); give '.' to mean the current folder"
"""What an empty path string is told: ``Path("")`` would silently be the current folder."""


def refuse_empty_paths(paths: dict[str, object], *, required: tuple[str, ...] = (),
                       lists: tuple[str, ...] | None = None) -> None:
    """:class:`InputError` naming the first of ``paths`` (argument name -> value; ``None``: not given)
    that is an empty or blank string, no path at all (a number, bytes, a dict: pathlib's TypeError
    would name no argument), a string holding a NUL character (no file can be named so), ``None`` although named in ``required``, or a list or tuple although
    ``lists`` is given and does not name it (a list or tuple is checked item by item; ``lists=None``:
    any may be one). The library's counterpart of the command line's empty-value check:
    ``register(a, b, out_dir="")`` would otherwise write into the current folder."""
    for name, value in paths.items():
        if value is None:
            if name in required:
                raise InputError(f"{name}: a path is needed here, got None")
            continue
        if isinstance(value, (list, tuple)) and lists is not None and name not in lists:
            raise InputError(f"{name}: expected one path, got a {type(value).__name__} of {len(value)}")
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if not isinstance(item, (str, os.PathLike)) or isinstance(os.fspath(item), bytes):
                raise InputError(f"{name}: expected a path (text or pathlib.Path), got {type(item).__name__} "
                                 f"{item!r}")
            if not os.fspath(item).strip():
                raise InputError(f"{name}: {EMPTY_PATH}")
            if "\0" in os.fspath(item):  # the system refuses it only when the file is opened, after the work
                raise InputError(f"{name} {os.fspath(item)!r}: holds a NUL character, which no file name can")


def path_list(value, name: str, what: str) -> list:
    """``value`` (any iterable of paths, read once: a generator would be used up by a second look) as a
    list; :class:`InputError` naming ``name`` when it is one path or no iterable (``what``: what the
    list holds, for the message). The items are checked by :func:`refuse_empty_paths`."""
    if isinstance(value, (str, os.PathLike)):
        raise InputError(f"{name}: expected a list of {what}, got one path", value)
    try:
        return list(value)
    except TypeError:
        raise InputError(f"{name}: expected a list of {what}, got {type(value).__name__}") from None


def _path(path: str | Path, name: str) -> Path:
    """``path`` as a :class:`Path`; an empty string is refused (:func:`refuse_empty_paths`)."""
    refuse_empty_paths({name: path}, lists=())
    return Path(path)


def require_file(path: str | Path) -> Path:
    """Return ``path`` as a :class:`Path`, raising :class:`InputError` if it is not a file."""
    p = _path(path, "input file")
    if not p.exists():
        raise InputError("file does not exist", p)
    if not p.is_file():
        raise InputError("is not a regular file", p)
    return p


def require_checkpoint_file(path: str | Path) -> Path:
    """:func:`require_file` for a model checkpoint; a missing bare word (no folder, no suffix, e.g. a
    mistyped ``random``) is told how to ask for an untrained network."""
    p = Path(path)
    if not p.exists() and not p.suffix and len(p.parts) == 1:
        raise InputError("no such checkpoint file (for an untrained network, give the model as 'random')", p)
    return require_file(p)


def broken_link(path: str | Path) -> str | None:
    """What is wrong with ``path`` when it is a symbolic link that cannot be followed ("a symbolic link to
    X, which does not exist", "a symbolic link that loops"), else ``None``: a folder made through it would
    fail with "File exists" after the work."""
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return LOOPING_LINK
        return f"a symbolic link to {os.readlink(path)}, which does not exist"
    return None


LOOPING_LINK = "a symbolic link that loops"


def _refuse_long_names(path: Path) -> None:
    """:class:`InputError` naming ``path`` when one of its names is longer than its file system takes
    (``PC_NAME_MAX`` of the nearest existing folder, else 255 bytes): the write would fail only after
    the work, where a folder on its way does not exist yet (``-o new/NAME``)."""
    existing = Path(os.path.abspath(path)).parent
    while not existing.is_dir() and existing != existing.parent:
        existing = existing.parent
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > limit:
            raise InputError(f"a name in it is too long for the file system ({size} bytes, at most {limit})", path)


def _require_makeable(folder: Path, output: Path, what: str) -> None:
    """:class:`InputError` naming ``output`` unless ``folder`` exists or can be made (its nearest
    existing ancestor is a folder this process may write in, and no missing folder on the way is a
    :func:`broken_link`); nothing is created."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        why = broken_link(existing)
        if why is not None:
            raise InputError(f"cannot make {what} ({existing} is {why})", output)
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"cannot make {what} ({existing} is a file)", output)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"cannot write there ({existing}: permission denied)", output)


def refuse_special_file(path: str | Path) -> None:
    """:class:`InputError` naming ``path`` when something other than a regular file or a folder is there
    (following links): an output is written to a temporary file and renamed into place, which would replace
    a FIFO, a device (``--json /dev/null`` run as root) or a socket with a regular file."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # not there (or a name the system refuses: its writer says so)
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise InputError("exists and is not a regular file (a FIFO, device or socket), which the output would "
                         "replace; give the path of a file", path)


def require_output_file(path: str | Path) -> Path:
    """Check before any work that ``path`` can be written as a file: not a folder, its parent folder
    exists or can be made, no name in it is too long for the file system, it is not ``-`` (standard output
    to a Unix tool: the report would not reach it), and it is not one of the own files of a run directory
    it lies in (:func:`run_dir_holding`, :func:`_in_run_dir`; a report beside a run's files is fine);
    :class:`InputError` naming it otherwise. A symbolic link is followed, as ``open(path, "w")`` would (its
    target is written, the link kept; a dangling link's target is made where its folder can be); one that
    loops is refused. Nothing is created here (the writers make missing folders), so a later input error
    leaves no empty folder behind."""
    p = _path(path, "output file")
    _refuse_long_names(p)
    if str(p) == "-":  # the Unix name of standard output, which would become a file named '-'
        raise InputError("standard output is not an output here (this would write a file named '-'); give a file "
                         "path (a file of that name: its full path)", p)
    if p.is_dir():
        raise InputError("is a folder; an output file is needed here", p)
    if broken_link(p) == LOOPING_LINK:
        raise InputError(f"is {LOOPING_LINK}; give the path of a file (a link to one is followed)", p)
    refuse_special_file(p)
    _require_makeable(p.parent, p, "its folder")
    real = Path(os.path.realpath(p))  # a link's target is what is written (made, where the link dangles)
    if os.path.islink(p):
        _require_makeable(real.parent, p, f"the folder of {real}, which it links to")
    run = run_dir_holding(real.parent)
    if run is not None and _in_run_dir(real, run):  # e.g. compare --json RUN/run.json
        raise InputError(f"would be one of the own files of the run directory {run} (its record, checkpoints, "
                         "logs or fold folders); write it elsewhere", p)
    return p


FILE_SUFFIXES = (".nii", ".nii.gz", ".csv", ".npy", ".ply", ".pcd", ".json", ".pt", ".pth", ".png", ".txt")
"""Suffixes of the files cyclereg reads and writes: a new output folder named like one is refused
(``register F M -o out.nii.gz`` made a folder ``out.nii.gz``); an existing folder of that name is taken."""


def require_output_dir(path: str | Path) -> Path:
    """Check before any work that ``path`` can be an output folder: an existing folder, or one that can
    be made (not made here) whose name does not end in one of :data:`FILE_SUFFIXES`; :class:`InputError`
    naming it otherwise."""
    p = _path(path, "output folder")
    _refuse_long_names(p)
    if p.exists() and not p.is_dir():
        raise InputError("exists and is not a folder; an output folder is needed here", p)
    suffix = next((x for x in FILE_SUFFIXES if p.name.lower().endswith(x) and len(p.name) > len(x)), None)
    if suffix is not None and not p.exists():
        raise InputError(f"names a file ({suffix}), but an output folder is needed here: its files get their own "
                         "names (give a folder, e.g. without the suffix)", p)
    _require_makeable(p, p, "this folder")
    return p


RUN_LOCK = ".cyclereg.lock"
"""Name of the lock file of a run directory and its fold folders (:data:`cyclereg.training.api.RUN_LOCK`)."""

CYCLES_LOCK = ".cyclereg-cycles.lock"
"""Name of the file in a run directory that every working ``cycle`` holds a shared lock of
(:func:`cyclereg.training.api._cycles_on_run`)."""

RUN_DIR_NAMES = frozenset({"run.json", "ensemble.json", "model_set.json", "README.md", RUN_LOCK, CYCLES_LOCK})
"""Files of a run directory (or a model folder such as ``models/copd``) at its top level, besides
checkpoints (``*.pt``), logs (``*.jsonl``) and the per-fold folders."""


def _in_run_dir(out: Path, run: Path) -> bool:
    """Whether the output ``out`` would be one of the run directory ``run``'s own files: in one of
    its folders, a checkpoint or log, or one of :data:`RUN_DIR_NAMES` (other files, e.g. a report
    written beside the run's files, are the user's)."""
    base = Path(os.path.realpath(run))
    parent = Path(os.path.realpath(out.parent))
    if parent != base:
        return base in parent.parents
    return out.name in RUN_DIR_NAMES or out.suffix in (".pt", ".jsonl")


def run_dir_holding(folder: str | Path) -> Path | None:
    """The cyclereg run directory (a folder with the ``run.json`` record that ``pretrain-random``
    writes: a JSON object with a ``kind`` and a ``config``) that ``folder`` is or lies in, or ``None``."""
    here = Path(os.path.realpath(Path(folder).expanduser()))
    for d in (here, *here.parents):
        try:
            record = json.loads((d / "run.json").read_text(encoding="utf-8-sig"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and "kind" in record and "config" in record:
            return d
    return None


def refuse_output_in_run(folder: str | Path, flag: str) -> None:
    """:class:`InputError` naming ``folder`` (``flag``: its option) when it is, or lies in, a run directory
    (:func:`run_dir_holding`): a run's folders hold its labels, checkpoints and logs only."""
    run = run_dir_holding(folder)
    if run is not None:
        raise InputError(f"{flag}: this folder is in the run directory {run}, whose folders hold the run's own "
                         "files only; write it elsewhere", folder)


def same_path(a: str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` name one file: the same path once made absolute with every link resolved
    (also links among the folders of a file not written yet), or the same file where both exist (hard
    links)."""
    a, b = Path(a).expanduser(), Path(b).expanduser()
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    return a.exists() and b.exists() and os.path.samefile(a, b)


def require_separate_output(output: str | Path | None, flag: str, *,
                            files: dict[str, str | Path | None] | None = None,
                            run_dirs: dict[str, str | Path | None] | None = None) -> None:
    """Refuse, before any work, an output file that would overwrite another file of the command:
    :class:`InputError` naming ``output`` (``flag``: its option) when it is the same file as one of
    ``files`` (what each is -> its path: the command's inputs and its other outputs; ``None``: not
    given), or would be one of the own files of a run directory in ``run_dirs`` (the runs the
    command reads: :func:`_in_run_dir`). Paths are compared with :func:`same_path`."""
    if output is None:
        return
    out = Path(os.path.abspath(Path(output).expanduser()))
    for what, other in (files or {}).items():
        if other is not None and same_path(out, other):
            raise InputError(f"{flag}: this is also {what}; write it elsewhere", output)
    for what, run in (run_dirs or {}).items():
        if run is not None and _in_run_dir(Path(os.path.realpath(out)), Path(run)):  # a link: its target
            raise InputError(f"{flag}: this would be one of the files of {what} ({run}), which the command "
                             "only reads; write it elsewhere", output)


def finite_number(value) -> bool:
    """Whether ``value`` (as read from JSON or a configuration) is a real, finite number: an ``int`` or
    ``float``, not a ``bool`` (an ``int`` to Python), a string, NaN or inf."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def whole_number(value) -> bool:
    """Whether ``value`` is an ``int`` and not a ``bool`` (a count, a number of voxels)."""
    return isinstance(value, int) and not isinstance(value, bool)


def python_number(value):
    """``value`` as a Python ``int`` / ``float`` where it is another whole or real number type (a NumPy
    scalar such as ``np.int64(4)`` or ``np.float32(0.5)``), else unchanged (``bool``s stay ``bool``s, and
    are refused where a number is checked). For the library's numeric parameters, which work like their
    Python values; counts and seeds that go into records are refused with :func:`_int_hint` instead."""
    if isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def _int_hint(value) -> str:
    """What a count or seed that is a whole number of another type (``np.int64(3)``) is told: torch and the
    records take Python ints, so it is refused with the way out rather than as no whole number."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (int, bool)):
        return f" (a Python int: give int(value) for this {type(value).__name__})"
    return ""


def require_count(flag: str, value: int | None, minimum: int) -> int | None:
    """Return ``value`` (``None`` = not given), raising :class:`InputError` naming ``flag``
    if it is below ``minimum`` or no whole number (a library caller's ``"2"`` or ``1.5``)."""
    if value is not None and not whole_number(value):
        raise InputError(f"{flag} {value!r}: need a whole number, {minimum} or more{_int_hint(value)}")
    if value is not None and value < minimum:
        raise InputError(f"{flag} {value}: need {minimum} or more")
    return value


MAX_SEED = 2**32 - 1
"""Largest seed a command takes (numpy's range): torch's generators reduce larger ones modulo 2^63, so
two seeds would give the same draws, and training derives its stages' seeds from the run's by
multiplication, which must stay within 64 bits."""


MAX_MODEL_SEED = 1000 * MAX_SEED + 1
"""Largest seed of ``--model random``: the random networks a run's stages start from are seeded
``1000 * seed + 0 or 1`` (:func:`cyclereg.training.scheduler.initial_network_seed`), and
``evaluate --run RUN --stage 0`` names that seed for ``--model random``, so every run seed's network
can be built again (well inside torch's 64-bit seeds)."""


def _seed_in_range(seed, largest: int) -> bool:
    """Whether ``seed`` is a whole number from 0 to ``largest``: the one rule of :func:`require_seed` (an option)
    and :func:`require_config_seed` (a stored configuration)."""
    return whole_number(seed) and 0 <= seed <= largest


def require_seed(seed: int | None, flag: str = "--seed", largest: int = MAX_SEED) -> int | None:
    """Return ``seed`` (``None`` = not given), raising :class:`InputError` naming ``flag`` unless it is a
    whole number from 0 to ``largest`` (:data:`MAX_SEED`; a random network's seed: :data:`MAX_MODEL_SEED`)."""
    if seed is not None and not _seed_in_range(seed, largest):
        raise InputError(f"{flag} {seed!r}: need a whole number from 0 to {largest}{_int_hint(seed)}")
    return seed


def require_config_fields(config, *, counts: dict[str, int] | None = None, optional_counts: tuple[str, ...] = (),
                          switches: tuple[str, ...] = (), numbers: dict[str, bool] | None = None) -> None:
    """:class:`ValueError` naming the first field of the dataclass ``config`` (e.g. from a run.json edited by hand)
    that is not what it must be: ``counts`` whole numbers of at least their value, ``optional_counts`` whole
    numbers of at least 1 or ``None``, ``switches`` ``True``/``False``, ``numbers`` finite numbers ``>= 0``
    (``> 0`` where the value is ``True``)."""
    for name, least in (counts or {}).items():
        value = getattr(config, name)
        if not whole_number(value) or value < least:
            raise ValueError(f"{name}={value!r}: need a whole number, {least} or more")
    for name in optional_counts:
        value = getattr(config, name)
        if value is not None and (not whole_number(value) or value < 1):
            raise ValueError(f"{name}={value!r}: need a whole number, 1 or more (or none)")
    for name in switches:
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"{name}={getattr(config, name)!r}: expected true or false")
    for name, positive in (numbers or {}).items():
        value = getattr(config, name)
        if not finite_number(value) or value < 0 or (positive and value == 0):
            raise ValueError(f"{name}={value!r}: need a finite number {'> 0' if positive else '>= 0'}")


def require_config_seed(seed) -> int:
    """A configuration's ``seed`` (e.g. from a run.json edited by hand): :class:`ValueError` unless a whole
    number from 0 to :data:`MAX_SEED` (a larger one overflowed in torch's ``manual_seed`` mid-run)."""
    if not _seed_in_range(seed, MAX_SEED):
        raise ValueError(f"seed={seed!r}: need a whole number from 0 to {MAX_SEED}")
    return seed


def require_switches(switches: dict[str, object]) -> None:
    """:class:`InputError` naming the first of ``switches`` (flag text -> value; ``None`` = not given) whose
    value is not ``True`` or ``False``: a library caller's ``adam="no"`` would otherwise count as on."""
    for flag, value in switches.items():
        if value is not None and not isinstance(value, bool):
            raise InputError(f"{flag} {value!r}: expected True or False")
