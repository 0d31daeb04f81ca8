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
    """Yield a temporary path beside `target`; on success rename it onto `target`, else delete it (and the
    folders made for it: missing parents of `target` are created, as `build -o` creates its folder)."""
    target = Path(target)
    created = _make_folders(target.parent)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        _remove_empty(created)
        raise _cannot_write(target.parent, exc) from None
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, default_file_mode())  # mkstemp creates 0600; the final file gets the usual permissions
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        _remove_empty(created)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _make_folders(directory: Path) -> list[Path]:
    """Create `directory` and its missing parents; the folders made, outermost first (OutputError if it cannot)."""
    created = [folder for folder in [*reversed(directory.parents), directory] if not folder.exists()]
    try:
        for folder in created:
            folder.mkdir()
    except OSError as exc:
        _remove_empty(created)
        raise _cannot_write(directory, exc) from None
    return created


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders this run made, deepest first, where they are still empty."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


def atomic_write_text(target: Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_npz(target: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` as an .npz file at `target`, atomically (what `load_npz` reads back)."""
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)


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


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same path once links are resolved, or one inode (a hard link)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def refuse_overwriting_inputs(outputs: list[Path], inputs: list[Path], option: str = "-o/--output-dir") -> None:
    """OutputError if any output path is one of the inputs (the model, its external data, the sample files), by
    any path to it: the one guard every command that writes runs before it does any work."""
    for output in outputs:
        for given in inputs:
            if _same_file(Path(output), Path(given)):
                raise OutputError(f"output {output} would overwrite the input {given}; choose another {option}")


NAME_MAX = 255  # bytes in one file name on the usual Linux file systems (ext4, xfs, btrfs, tmpfs)


STAGING_SUFFIX_BYTES = 24  # what atomic writes add to a name while staging (".NAME.XXXXXXXX.tmp")


def check_name_length(output: Path, fix: str) -> None:
    """OutputError when the file system would refuse `output`'s name (as staged, with a few bytes more)."""
    size = len(os.fsencode(Path(output).name))
    if size + STAGING_SUFFIX_BYTES > NAME_MAX:
        raise OutputError(f"output file name {Path(output).name[:40]}… is too long ({size} bytes; at most "
                          f"{NAME_MAX - STAGING_SUFFIX_BYTES} here); {fix}")


def check_output_file(output: Path, inputs: list[Path], option: str = "-o/--output") -> Path:
    """A command's one output file: not one of `inputs`, not a folder, with a name the file system takes (staged
    names add a few characters), in a folder that exists or can be created."""
    output = Path(output)
    if output.is_dir():
        raise OutputError(f"{option} {output} is a folder; give the path of the file to write")
    check_name_length(output, "choose a shorter name")
    refuse_overwriting_inputs([output], inputs, option)
    check_output_dir(output.parent)
    return output


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
def output_lock(directory: Path) -> Iterator[Path]:
    """Hold the output folder for a whole run, from its first step: a second run into it is refused at once, not
    after a full build. The folder is created if needed and removed again if this run leaves it empty."""
    directory = Path(directory)
    created = _make_folders(directory)
    try:
        with _folder_lock(directory):
            yield directory
    finally:
        _remove_empty(created)


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
    created = _make_folders(directory)
    try:
        with _folder_lock(directory):
            try:
                stage = Path(tempfile.mkdtemp(dir=directory, prefix=".lrdeploy-stage-"))
            except OSError as exc:
                raise _cannot_write(directory, exc) from None
            try:
                yield stage
                publish(stage, directory)
            except OSError as exc:
                if exc.errno not in WRITE_ERRORS:
                    raise  # not a write failure: a bug or an input problem keeps its own error
                raise _cannot_write(directory, exc) from None
            finally:
                shutil.rmtree(stage, ignore_errors=True)
    except BaseException:
        _remove_empty(created)
        raise


def _staged_files(stage: Path, directory: Path) -> list[tuple[Path, Path]]:
    """(staged file, where it goes) for every file under `stage`; OutputError, before anything moves, where
    something of another kind is in the way (a folder where a file goes, a file where a folder goes)."""
    moves = []
    for path in sorted(stage.rglob("*")):
        target = directory / path.relative_to(stage)
        if path.is_dir():
            if target.exists() and not target.is_dir():
                raise OutputError(f"cannot write into {target}: it is a file, where this run writes a folder; move it "
                                  "or choose another -o/--output-dir")
        elif target.is_dir():
            raise OutputError(f"cannot write {target}: a folder of that name is in the way; move it or choose another "
                              "-o/--output-dir")
        else:
            moves.append((path, target))
    return moves


def publish(stage: Path, directory: Path) -> None:
    """Move every file staged under `stage` to the same place under `directory`, all or nothing.

    Staged folders merge into existing ones: their files replace namesakes, and nothing else there is touched.
    Every target is checked before the first move; if a move still fails, the files replaced so far get their old
    contents back (kept as hard links, or copies, until the end) and the new files are removed again."""
    moves = _staged_files(stage, directory)
    backup = Path(tempfile.mkdtemp(dir=directory, prefix=".lrdeploy-backup-"))
    done: list[tuple[Path, Path | None]] = []
    created: list[Path] = []
    try:
        for index, (source, target) in enumerate(moves):
            created += _make_folders(target.parent)
            kept = None
            if target.exists():
                kept = backup / str(index)
                try:
                    os.link(target, kept)
                except OSError:
                    shutil.copy2(target, kept)
            os.replace(source, target)
            done.append((target, kept))
    except BaseException:
        for target, kept in reversed(done):
            if kept is not None:
                os.replace(kept, target)
            else:
                target.unlink(missing_ok=True)
        _remove_empty(created)
        raise
    finally:
        shutil.rmtree(backup, ignore_errors=True)


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
