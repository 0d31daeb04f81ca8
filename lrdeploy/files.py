"""Safe file handling: atomic writes, output-directory checks, pickle-free array loading.

Nothing lrdeploy writes is ever half there: each file is written to a temporary name in the same
directory and renamed into place, and the temporary is removed if anything fails.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from lrdeploy.errors import CalibrationDataError, OutputError


def default_file_mode() -> int:
    """The permissions a new file gets from the process umask (0644 with the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success rename it onto `target`, else delete it."""
    target = Path(target)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, default_file_mode())  # mkstemp creates 0600; the final file gets the usual permissions
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(target: Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _cannot_write(directory: Path, exc: OSError) -> OutputError:
    reason = exc.strerror or type(exc).__name__
    return OutputError(f"cannot write to output directory {directory} ({reason}); choose another with -o/--output-dir")


def check_output_dir(directory: Path) -> Path:
    """Prove `directory` could be written, creating nothing (an early error must not leave an empty folder)."""
    directory = Path(directory)
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        reason = "Not a directory" if not existing.is_dir() else "Permission denied"
        raise OutputError(f"cannot write to output directory {directory} ({reason}); choose another with -o/--output-dir")
    return directory


def refuse_overwriting_inputs(outputs: list[Path], inputs: list[Path]) -> None:
    """OutputError if any output path is one of the inputs (the model, its external data, the sample files)."""
    taken = {Path(p).resolve(): Path(p) for p in inputs}
    for output in outputs:
        if Path(output).resolve() in taken:
            raise OutputError(f"output {output} would overwrite the input {taken[Path(output).resolve()]}; "
                              "choose another -o/--output-dir")


WRITE_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}  # full, too large...
_LOCKED: set[Path] = set()  # output folders this process holds, so that nested output sets do not lock twice


@contextlib.contextmanager
def _folder_lock(directory: Path) -> Iterator[None]:
    """An exclusive lock on the folder itself (flock on its descriptor: no lock file to leave behind)."""
    key = directory.resolve()
    if key in _LOCKED:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"output directory {directory} is in use by another lrdeploy run; wait for it to "
                              "finish or choose another -o/--output-dir") from None
        _LOCKED.add(key)
        try:
            yield
        finally:
            _LOCKED.discard(key)
    finally:
        os.close(fd)


@contextlib.contextmanager
def output_set(directory: Path) -> Iterator[Path]:
    """Stage a run's outputs and publish them together, or not at all:

        with output_set(out) as stage:      # out created if needed, and locked against other runs
            write files into stage/ ...     # a hidden folder inside out
        # here every staged file has replaced its namesake in out

    Any failure (an error, a full disk, Ctrl-C) removes the staging folder, and `out` too when this run created
    it and nothing else is in it. A write error is an OutputError.
    """
    directory = Path(directory)
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot_write(directory, exc) from None
    try:
        with _folder_lock(directory):
            try:
                stage = Path(tempfile.mkdtemp(dir=directory, prefix=".lrdeploy-stage-"))
            except OSError as exc:
                raise _cannot_write(directory, exc) from None
            try:
                yield stage
                for item in sorted(stage.iterdir()):
                    os.replace(item, directory / item.name)
            except OSError as exc:
                if exc.errno not in WRITE_ERRORS:
                    raise  # not a write failure: a bug or an input problem keeps its own error
                raise _cannot_write(directory, exc) from None
            finally:
                shutil.rmtree(stage, ignore_errors=True)
    except BaseException:
        if created and directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
        raise


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Load every array of an .npz file with allow_pickle=False; pickled (object) arrays are refused."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise CalibrationDataError(
                f"{path} holds pickled (object) arrays, which lrdeploy never loads; "
                "save plain numeric arrays with numpy.savez"
            ) from None
        raise CalibrationDataError(f"{path} is not a readable .npz file ({exc}); write it with numpy.savez") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise CalibrationDataError(f"{path} is not a readable .npz file ({exc}); write it with numpy.savez") from None
