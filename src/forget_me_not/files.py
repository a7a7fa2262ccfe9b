"""Writing outputs: a folder probed before the work, files published whole with the mode the
user's umask gives (temp file in the same folder, then rename)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from forget_me_not.errors import FmnError


def umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def probe_writable(folder: str | Path, flag: str = "--out") -> None:
    """Create and remove a file in `folder`: `os.access` says yes to root even where it fails."""
    folder = Path(folder)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fmn_probe_")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise FmnError(f"output folder {folder} is not writable ({err.strerror or err}): pick "
                       f"another {flag}") from None


def temp_beside(path: Path) -> str:
    """A temp file name in `path`'s folder, for `publish` to rename into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return tmp


def publish(tmp: str | Path, path: str | Path, *, folder: bool = False) -> Path:
    """Give `tmp` the umask's mode and rename it to `path`; the temp file never stays behind."""
    try:
        os.chmod(tmp, (0o777 if folder else 0o666) & ~umask())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise FmnError(f"could not write {path} ({err.strerror or err}): pick another --out") \
            from None
    return Path(path)


def write_atomic(path: str | Path, save, what: str = "output") -> Path:
    """`save(tmp_path)` writes the file; then it is published. Any failure leaves nothing."""
    path = Path(path)
    try:
        tmp = temp_beside(path)
    except OSError as err:
        raise FmnError(f"could not write {what} {path} ({err.strerror or err}): pick another "
                       "--out") from None
    try:
        save(tmp)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise FmnError(f"could not write {what} {path} ({err.strerror or err}): pick another "
                       "--out") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return publish(tmp, path)
