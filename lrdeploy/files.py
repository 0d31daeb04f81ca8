"""Safe file handling: atomic writes, output-directory checks, pickle-free array loading.

Nothing lrdeploy writes is ever half there: each file is written to a temporary name in the same
directory and renamed into place, and the temporary is removed if anything fails.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from lrdeploy.errors import CalibrationDataError, OutputError


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success rename it onto `target`, else delete it."""
    target = Path(target)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; the final file gets the usual permissions
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(target: Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def prepare_output_dir(directory: Path) -> Path:
    """Create `directory` if needed and prove it is writable, before any expensive work starts."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".lrdeploy-probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputError(
            f"cannot write to output directory {directory} ({reason}); choose another with -o/--output-dir"
        ) from None
    return directory


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
