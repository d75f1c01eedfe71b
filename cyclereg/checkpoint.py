"""Checkpoints: ``{"config": dict, "state_dict": ..., "version": str, "kind": str, "extra": dict}``.

Written atomically (temporary file + ``os.replace``); modules are never pickled and
loading uses ``weights_only=True``. torch is imported where a checkpoint is written or read,
so the JSON and atomic-write helpers here cost torch-free commands (``compare``) no torch import.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from cyclereg import __version__
from cyclereg.errors import (LOOPING_LINK, InputError, broken_link, refuse_special_file, require_checkpoint_file,
                             require_file, require_output_file, same_path)
from cyclereg.interrupts import raise_pending


def to_jsonable(obj: Any) -> Any:
    """Dataclasses / tuples / paths / tensors / numpy arrays and scalars -> plain JSON-compatible Python
    objects; a float (also one inside a tensor or array) that is NaN or
    infinite becomes ``None`` (JSON ``null``), since strict JSON has no such number and Python's
    ``NaN`` / ``Infinity`` tokens break other readers (jq, JavaScript, most JSON libraries)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    torch = sys.modules.get("torch")  # a tensor exists only once torch is imported
    if torch is not None and isinstance(obj, torch.Tensor):
        return to_jsonable(obj.tolist())  # its NaN / inf elements too
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(obj, (numpy.ndarray, numpy.generic)):
        return to_jsonable(obj.tolist())  # float32 scalars and arrays: Python numbers, NaN / inf as None
    return obj


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_directory(folder: str | Path) -> None:
    """Make a rename in ``folder`` durable (``fsync`` of the directory itself): without it a power
    loss right after ``os.replace`` can bring back the earlier file, or none. Quietly skipped where
    the platform cannot open or sync a directory (Windows, some network file systems)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


TEMP_NAME_KEEP = 200
"""Bytes of the target's name (in the file system's encoding) that an atomic write's temporary file
(``.NAME.XXXXXXXX.tmp``) and an output set's aside name (:func:`_asides`) keep."""


def _name_head(name: str) -> str:
    """``name`` cut to at most :data:`TEMP_NAME_KEEP` bytes in the file system's encoding, at a character
    boundary (a non-ASCII name of up to 255 bytes has fewer characters than bytes)."""
    name = name[:TEMP_NAME_KEEP]
    while len(os.fsencode(name)) > TEMP_NAME_KEEP:
        name = name[:-1]
    return name


def link_followed(path: Path) -> Path:
    """``path``, or where it leads when it is a symbolic link (through every link): an output written to a
    link replaces its target, as ``open(path, "w")`` would, and the link stays."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def atomic_write_bytes(path: str | Path, writer) -> None:
    """Call ``writer(file_object)`` on a temporary file next to ``path`` and move it into place
    (a symbolic link's target, beside it: :func:`link_followed`).

    The file gets the permissions a plain ``open(path, "w")`` would give (``0o666`` less the
    umask), not the private ``0o600`` of the temporary file."""
    path = Path(path)
    raise_pending()  # a kill deferred during an import stops the command before it writes
    refuse_special_file(path)
    tmp = None
    try:
        target = link_followed(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        # the name cut to TEMP_NAME_KEEP bytes: a legal name of up to 255 stays legal with ".", 8 random
        # characters and ".tmp" around it
        fd, tmp = tempfile.mkstemp(prefix=f".{_name_head(target.name)}.", suffix=".tmp", dir=target.parent)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        tmp = None
        fsync_directory(target.parent)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno is not None:
            # name the file the caller asked for, not the temporary one
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise


def atomic_leftover(path: Path) -> bool:
    """Whether ``path`` is the temporary file of an :func:`atomic_write_bytes` that was killed before
    it could clean up (``kill -9``, power loss): ``.NAME.XXXXXX.tmp``."""
    return path.name.startswith(".") and path.name.endswith(".tmp") and path.is_file()


class OutputStage:
    """The staging folder of :func:`staged_outputs`: write each output to ``stage / name``; list in
    :attr:`stale` the files of the output folder to remove once the new set is in (an earlier
    command's outputs this one does not write, :func:`stale_outputs`), or set :attr:`find_stale` to find
    them: it is called under the output folder's lock, right before the move-in, so that a second command
    moving its set into the same folder meanwhile is seen; in :attr:`inputs` the command's input files: an
    output that would replace one of them stops the command before anything is moved in. An output whose
    path in the output folder is a symbolic link is staged under its name in a staging folder beside the
    link's target (:func:`link_followed`), which the move-in replaces: the link stays, as with
    ``open(path, "w")``."""

    def __init__(self, path: Path, out: Path | None = None):
        self.path = path
        self.out = path.parent if out is None else out
        self.stale: list[Path] = []
        self.find_stale: Callable[[], list[Path]] | None = None
        self.inputs: list[Path] = []
        self.link_stages: dict[Path, Path] = {}  # a linked output's target folder -> its staging folder
        self.links: dict[Path, tuple[str, Path]] = {}  # staged file -> (output name, the link's target)
        self.made: list[Path] = []  # folders made for the links' targets

    def __truediv__(self, name: str) -> Path:
        link = self.out / name
        if not link.is_symlink() or broken_link(link) == LOOPING_LINK:  # a looping link: refused at the move-in
            return self.path / name
        target = link_followed(link)
        if target.parent not in self.link_stages:
            self.link_stages[target.parent], made = _make_staging_folder(target.parent)
            self.made.extend(made)
        staged = self.link_stages[target.parent] / name  # its own name: writers choose a format by suffix
        self.links[staged] = (name, target)
        return staged


class OutputsNotRestored(OSError):
    """Moving a set of outputs in failed and some earlier outputs could not be put back; they are
    kept in the staging folder the message names."""


STAGING_PREFIX = ".cyclereg-staging."
"""Name prefix of the hidden folder a set of outputs is written into before it is moved in."""


def _staging_owner() -> str:
    """``PID@HOST``: who a staging folder belongs to (its name, after :data:`STAGING_PREFIX`)."""
    return f"{os.getpid()}@{socket.gethostname()}"


def _owner_gone(name: str) -> bool:
    """Whether the staging folder ``name`` (``STAGING_PREFIX + PID@HOST.XXXXXXXX``) belongs to a process of this
    host that no longer runs (killed outright, ``kill -9``: nothing removed it). Folders of other hosts (a
    shared file system), of older versions (no owner in the name) and of live processes are not."""
    owner = name[len(STAGING_PREFIX):].rpartition(".")[0]
    pid, at, host = owner.partition("@")
    if not at or host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, but another user's
        return False
    return False


def _make_staging_folder(folder: Path) -> tuple[Path, list[Path]]:
    """Make ``folder`` (with missing parents) and a hidden staging folder in it; returns the staging folder
    and the folders made for it (for :func:`_remove_if_empty` when the write fails). Staging folders that a
    process killed outright left here (:func:`_owner_gone`) are removed first."""
    made = list(itertools.takewhile(lambda f: not f.exists(), (folder, *folder.parents)))
    folder.mkdir(parents=True, exist_ok=True)
    if not made:
        for left in folder.glob(STAGING_PREFIX + "*"):
            if left.is_dir() and not left.is_symlink() and _owner_gone(left.name):
                shutil.rmtree(left, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{_staging_owner()}.", dir=folder)), made


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove those of ``folders`` (made for a set of outputs that was not moved in) that are empty,
    deepest first."""
    for folder in sorted(set(folders), key=lambda f: len(f.parts), reverse=True):
        try:
            folder.rmdir()
        except OSError:  # not empty: something else is in it
            pass


@contextmanager
def _folder_locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` itself (its directory file: no lock file is left in an
    output folder), waiting for it; where the system or file system has none, the block runs unlocked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # e.g. a network file system without flock: as before, unlocked
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def staged_outputs(out_dir: str | Path) -> Iterator[OutputStage]:
    """Write one command's output files as a set: the body writes them (atomically, by name) into the
    yielded :class:`OutputStage`, a hidden folder inside ``out_dir``; when it finishes, every staged file
    is moved into ``out_dir`` (a rename each, same file system), then the body's :attr:`OutputStage.stale`
    files are removed. If a file cannot be moved in (e.g. an existing output is write-protected), those
    already moved are taken out again and the earlier files restored. If the body fails, nothing of it
    reaches ``out_dir`` and folders this call made are removed again when empty. An output that is a symbolic
    link in ``out_dir`` is followed (:class:`OutputStage`): its target is replaced within the same move-in, the
    link stays. Errors name the output, not a temporary or staged file."""
    out = Path(out_dir)
    staging, made = _make_staging_folder(out)
    stage = OutputStage(staging, out)
    keep_stage = False
    moved = False
    try:
        try:
            yield stage
        except OSError as exc:
            name = Path(exc.filename) if isinstance(exc.filename, str) else None
            if exc.errno is not None and name is not None and name in stage.links:
                raise OSError(exc.errno, exc.strerror, str(out / stage.links[name][0])) from None
            if exc.errno is not None and name is not None and stage.path in name.parents:
                raise OSError(exc.errno, exc.strerror, str(out / name.relative_to(stage.path))) from None
            raise
        # (staged file, output name, where it goes): a linked output onto the link's target
        files = [(f, f.name, out / f.name) for f in sorted(stage.path.iterdir())] + [
            (f, name, target) for f, (name, target) in stage.links.items() if f.exists()]
        for _, name, _ in files:
            refuse_special_file(out / name)
        refuse_replacing_inputs([name for _, name, _ in files], out, stage.inputs)
        new = {name for _, name, _ in files}
        with _folder_locked(out):  # another command's set moved in meanwhile is seen by find_stale
            found = stage.find_stale() if stage.find_stale is not None else []
            # the earlier outputs this set does not hold go aside (into the staging folder, removed below) within
            # the move-in: an interruption after it leaves no earlier file beside a record that does not list it
            # (a stale file that a linked output of this set was written into is this set's output now)
            written = {os.path.realpath(target) for _, _, target in files}
            moves = [(f, target, "earlier") for f, _, target in files] + [
                (None, old, "stale") for old in dict.fromkeys([*stage.stale, *found])
                if old.name not in new and os.path.realpath(old) not in written]
            try:
                # an earlier output goes aside in the staging folder of its new file (the same file system)
                asides = _asides([(stage.path if staged is None else staged.parent, kind, target)
                                  for staged, target, kind in moves])
                _move_in([(staged, target, aside) for (staged, target, _), aside in zip(moves, asides)])
            except OutputsNotRestored:
                keep_stage = True
                raise
            moved = True
            for folder in (out, *stage.link_stages):
                fsync_directory(folder)
    finally:
        if not keep_stage:
            for folder in (stage.path, *stage.link_stages.values()):
                shutil.rmtree(folder, ignore_errors=True)
        # folders made for a dangling link's target that the body did not write into go again, as on a failure
        _remove_if_empty(stage.made if moved else [*made, *stage.made])


def refuse_replacing_inputs(names: list[str], out_dir: str | Path, inputs: list[Path]) -> None:
    """:class:`InputError` naming the input when an output called one of ``names`` in ``out_dir`` would
    replace one of ``inputs`` (same name, or the same file through a link), or naming the output when it
    is a folder (:func:`refuse_folders_at`). Commands call it before their work with the names they will
    write; :func:`staged_outputs` checks the files once more when it moves them in (:attr:`OutputStage.inputs`).
    Two of ``names`` that lead to one file (a symbolic link to another output) are refused, naming the link."""
    refuse_folders_at(names, out_dir)
    out = Path(out_dir)
    into: dict[str, str] = {}  # where each output's content goes (a symbolic link's target) -> its name
    for name in names:
        first = into.setdefault(os.path.realpath(out / name), name)
        if first != name:
            raise InputError(f"a symbolic link to {first}, another output of this command in {out}: both would be "
                             f"written into one file; remove the link or write to another folder (nothing was written)",
                             out / name)
        target = out / name
        for given in inputs:
            if same_path(target, given):
                raise InputError(f"an input of this command, which its output {name} would replace in "
                                 f"{out}; write to another folder (nothing was written)", given)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, lambda fh: fh.write(text.encode("utf-8")))


def refuse_folders_at(names: list[str], out_dir: str | Path) -> None:
    """:class:`InputError` naming the first output ``out_dir / name`` that is a folder (or a link to one):
    moving a file in would put the folder aside and delete it with the staging folder; or a symbolic link
    that a single output file would not follow (:func:`~cyclereg.errors.require_output_file`: one that loops,
    or whose target's folder cannot be made). Commands call it before their work with the names they will
    write; the set writers check once more when they move in."""
    for name in names:
        target = Path(out_dir) / name
        if target.is_dir():
            raise InputError("is a folder; an output file is needed here (nothing was written)", target)
        if target.is_symlink():
            require_output_file(target)


def _asides(wanted: list[tuple[Path, str, Path]]) -> list[Path]:
    """Where :func:`_move_in` puts earlier files aside: for each ``(stage, kind, target)`` (an earlier output
    ``target``, to go into the staging folder ``stage``) a name ``.KIND.XXXXXXXX.NAME`` there, with the name cut
    to :data:`TEMP_NAME_KEEP` bytes (an output's name may be near the file system's limit), unlike every file in
    the folder (a staged output may be named ``.earlier.X`` too) and every other aside name: each is made
    (:func:`tempfile.mkstemp`) while the others are, then all are removed again, so that :func:`_move_in`, which
    judges by which files exist, finds only the earlier files it moved there (nothing else writes in a staging
    folder)."""
    made: list[Path] = []
    try:
        for stage, kind, target in wanted:
            try:
                fd, path = tempfile.mkstemp(prefix=f".{kind}.", suffix=f".{_name_head(target.name)}", dir=stage)
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, str(target)) from None
            os.close(fd)
            made.append(Path(path))
        return list(made)
    finally:
        for path in made:
            path.unlink(missing_ok=True)


def _move_in(steps: list[tuple[Path | None, Path, Path]]) -> None:
    """Rename the staged files into place as a set, ``steps`` = ``(staged, target, aside)``: an existing
    ``target`` is first moved to ``aside`` (in a staging folder); ``staged`` ``None`` only moves ``target``
    aside (an earlier output the new set removes). On a failure (or an interruption)
    every step taken is undone, judged by which files exist, and the error names the output;
    :class:`OutputsNotRestored` if an earlier file could not be put back (it stays in its staging
    folder, which the message names)."""
    raise_pending()  # a kill deferred during an import: before the first rename, not halfway
    done: list[tuple[Path | None, Path, Path]] = []
    try:
        for staged, target, aside in steps:
            done.append((staged, target, aside))
            try:
                if target.exists() or target.is_symlink():
                    os.replace(target, aside)
                if staged is not None:
                    os.replace(staged, target)
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, str(target)) from None
    except BaseException as failure:
        lost = []
        for staged, target, aside in reversed(done):
            try:
                if aside.exists() or aside.is_symlink():
                    os.replace(aside, target)  # the earlier file back (over the new one, if it was moved)
                elif staged is not None and not staged.exists() and target.exists():
                    target.unlink()  # a new file without an earlier one: taken out again
            except OSError:
                lost.append((aside if aside.exists() else target, aside.parent))
        if lost:
            raise OutputsNotRestored(getattr(failure, "errno", None) or 5,
                                     f"could not move the new outputs in, nor put all earlier ones back: they are "
                                     f"in {lost[0][1]}", str(lost[0][0])) from failure
        raise


class FileSet:
    """The staging of :func:`staged_file_set`: ``files(target)`` is the path to write ``target`` to (the same
    file name in a hidden staging folder beside it, so that writers choosing a format by suffix still
    do; a symbolic link's target, beside that: :func:`link_followed`)."""

    def __init__(self):
        self.stages: dict[Path, Path] = {}  # target folder -> its staging folder
        self.targets: dict[Path, Path] = {}  # staged file -> target
        self.made: list[Path] = []  # folders made for the targets

    def __call__(self, target: str | Path) -> Path:
        target = link_followed(Path(target))
        folder = target.parent
        if folder not in self.stages:
            self.stages[folder], made = _make_staging_folder(folder)
            self.made.extend(made)
        staged = self.stages[folder] / target.name
        self.targets[staged] = target
        return staged


@contextmanager
def staged_file_set() -> Iterator[FileSet]:
    """Write one command's output files, in any folders, as a set: the body writes each ``target`` to
    ``files(target)`` of the yielded :class:`FileSet`; when it finishes, every staged file is renamed onto its
    target (an earlier file moved aside first); if one cannot be, those already moved are taken out again
    and the earlier files restored. If the body fails or is interrupted, no target changes and folders
    made for them are removed again when empty. Errors name the target, not a staged file."""
    files = FileSet()
    keep_stages = False  # an earlier file could not be put back: it stays in its staging folder
    moved = False
    try:
        try:
            yield files
        except OSError as exc:
            target = files.targets.get(Path(exc.filename)) if isinstance(exc.filename, str) else None
            if exc.errno is not None and target is not None:
                raise OSError(exc.errno, exc.strerror, str(target)) from None
            raise
        written = [(staged, target) for staged, target in files.targets.items() if staged.exists()]
        for _, target in written:
            refuse_folders_at([target.name], target.parent)
        try:
            asides = _asides([(staged.parent, "earlier", target) for staged, target in written])
            _move_in([(staged, target, aside) for (staged, target), aside in zip(written, asides)])
        except OutputsNotRestored:
            keep_stages = True
            raise
        moved = True
        for folder in files.stages:
            fsync_directory(folder)
    finally:
        for stage in files.stages.values():
            if not keep_stages:
                shutil.rmtree(stage, ignore_errors=True)
        if not moved:
            _remove_if_empty(files.made)


def recorded_outputs(record: dict) -> list:
    """The output names a command's ``config.json`` ``record`` lists: ``outputs`` as a list (keypoint
    path) or ``outputs.files`` (dense path); ``[]`` when it lists none."""
    outputs = record.get("outputs") if isinstance(record, dict) else None
    names = outputs.get("files") if isinstance(outputs, dict) else outputs
    return names if isinstance(names, list) else []


def stale_outputs(out_dir: Path, written: list[str], keep: tuple[Path, ...] = ()) -> list[Path]:
    """The files an earlier command recorded as its outputs in ``out_dir/config.json``
    (``outputs``, a list of names, or ``outputs.files``) that this run does not write (``written``),
    except the paths in ``keep`` (this run's inputs): removed once the new outputs are in
    (:attr:`OutputStage.stale`), so that the folder holds one run's outputs. Only a ``config.json`` that
    cyclereg's ``register`` wrote (its ``command`` and ``cyclereg_version``) names files to remove: another
    tool's ``config.json`` is replaced, the files it lists are left alone."""
    try:
        record = json.loads((Path(out_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return []
    if not (isinstance(record, dict) and record.get("command") == "register" and "cyclereg_version" in record):
        return []
    names = recorded_outputs(record)
    kept = {Path(k).resolve() for k in keep}
    stale = []
    for name in names:
        target = Path(out_dir) / str(name)
        if (isinstance(name, str) and name not in written and Path(name).name == name
                and target.resolve() not in kept and target.is_file()):
            stale.append(target)
    return stale


def json_text(obj: Any, *, indent: int | None = None) -> str:
    """``obj`` (dataclasses allowed) as strict JSON text (non-finite floats as ``null``,
    :func:`to_jsonable`): every JSON file and log line cyclereg writes goes through here."""
    return json.dumps(to_jsonable(obj), indent=indent, allow_nan=False)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` (dataclasses allowed) as indented, strict JSON (:func:`json_text`), atomically."""
    atomic_write_text(path, json_text(obj, indent=2) + "\n")


def save_checkpoint(path: str | Path, *, kind: str, config: Any, state_dict: dict, extra: dict | None = None) -> None:
    """Save a model checkpoint atomically.

    Args:
        kind: model family, e.g. ``"cloud"`` or ``"dense"``; checked on load.
        config: the (dataclass) configuration needed to rebuild the model.
        state_dict: tensors only.
    """
    payload = {
        "kind": kind,
        "config": to_jsonable(config),
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "version": __version__,
        "extra": to_jsonable(extra or {}),
    }
    import torch

    atomic_write_bytes(path, lambda fh: torch.save(payload, fh))


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes: names a checkpoint exactly wherever it is moved."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


KIND_HINTS = {
    ("cloud", "dense"): " (a keypoint-cloud model: register two scans with it through --via-keypoints)",
    ("dense", "cloud"): " (a dense volume model: it registers NIfTI volumes, not point clouds)",
}
"""What to say after "checkpoint is for a 'A' model, expected 'B'" for (A, B)."""


def load_checkpoint(path: str | Path, *, kind: str | None = None) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors to CPU)."""
    import torch

    p = require_checkpoint_file(path)
    try:
        with warnings.catch_warnings():  # torch's note on a plain pickle's protocol: the error below says enough
            warnings.simplefilter("ignore")
            payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is bad input
        raise InputError(f"not a readable cyclereg checkpoint ({type(exc).__name__})", p) from None
    if not isinstance(payload, dict) or not {"config", "state_dict", "version"} <= set(payload):
        raise InputError("not a cyclereg checkpoint (needs config, state_dict, version)", p)
    if kind is not None and payload.get("kind") != kind:
        hint = KIND_HINTS.get((payload.get("kind"), kind), "")
        raise InputError(f"checkpoint is for a '{payload.get('kind')}' model, expected '{kind}'{hint}", p)
    bad = nonfinite_weights(payload["state_dict"])
    if bad:
        raise InputError(f"the network's weights hold NaN or inf ({bad}; a diverged or damaged model): it would "
                         "register to NaN", p)
    return payload


def nonfinite_weights(state_dict) -> str | None:
    """The name of the first floating-point tensor of ``state_dict`` (a mapping of names to tensors;
    anything else: ``None``, its loader names what is wrong) holding NaN or inf, or ``None``."""
    import torch

    if not isinstance(state_dict, dict):
        return None
    for name, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            return str(name)
    return None


def data_fingerprint(*paths: str | Path) -> str:
    """SHA-256 (hex) over the SHA-256 of each file's bytes, in order: names a pair's (or a scan's) data
    wherever it lies and whatever its dataset or id is called."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(file_sha256(require_file(path)).encode())
    return digest.hexdigest()


def training_record(dataset: str, fold: int | None, *, pairs: dict[str, dict[str, str]] | None = None,
                    images: dict[str, str] | None = None) -> dict:
    """What a trained checkpoint records of its training data (``extra["training"]``): the dataset's
    name and fold (for people), and the :func:`data_fingerprint` of each file it learnt from:
    ``pairs`` (keypoint pairs: ``{id: {"fixed": fp, "moving": fp}}`` of their keypoint files) or
    ``images`` (volume runs: ``{file name: fp}`` of each training scan). Never landmarks or labels.
    :func:`training_data` reads it back."""
    rec: dict = {"dataset": str(dataset), "fold": fold}
    if pairs is not None:
        rec["pairs"] = dict(sorted(pairs.items()))
    if images is not None:
        rec["images"] = dict(sorted(images.items()))
    return rec


def training_data(checkpoint: dict) -> dict | None:
    """The :func:`training_record` of a loaded checkpoint (or of a dict with its ``extra``), ``None``
    when it has none (checkpoints from before the record, random networks). An ensemble made by
    :func:`cyclereg.clouds.api.combine_cloud_models` records the union of its members' pairs."""
    rec = (checkpoint.get("extra") or {}).get("training")
    if isinstance(rec, dict) and (isinstance(rec.get("pairs"), dict) or isinstance(rec.get("images"), dict)):
        return rec
    return None
