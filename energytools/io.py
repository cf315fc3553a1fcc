"""Files that are never half-written: atomic writes, a run lock, hashing."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import UserError, option_name


#: what atomic_path names a file while it is being written
PARTIAL_PREFIX = ".tmp-"

#: a full, read-only or forbidden disk: the user's environment, not a bug
DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM, errno.EFBIG}
_DISK_WORDS = ("No space left on device", "Disk quota exceeded", "Read-only file system", "Permission denied",
               "File too large")


#: what a write error advises by default: score parts, augment shards are kept and resumed
RESUME_WRITES = "re-run the same command, which resumes what was finished (score parts, augment shards)"


class WriteError(UserError):
    """An output could not be written (disk full, read-only, forbidden): names the file and the
    operation. What atomic_path was writing is removed; finished work stays (resumable).
    ``advice`` says what to run once the disk is fixed; a caller that knows better (a training
    run resumes with --resume, a recipe continues by itself) replaces it (:meth:`advise`)."""

    def __init__(self, path, operation: str, reason: str, advice: str = RESUME_WRITES):
        self.path, self.operation, self.reason, self.advice = path, operation, reason, advice
        # an atomic write names its operation and has removed what it wrote; a folder has none
        done = f" ({operation}): {reason}; the half-written file was removed:" if operation else f": {reason};"
        super().__init__(f"cannot write {path}{done} free space (or fix the permissions) and {advice}")

    def advise(self, advice: str) -> WriteError:
        """The same error with other advice."""
        return WriteError(self.path, self.operation, self.reason, advice)


def disk_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the disk's fault (pyarrow's errors may carry the reason only as text)."""
    return isinstance(exc, OSError) and (exc.errno in DISK_ERRNOS or any(w in str(exc) for w in _DISK_WORDS))


def disk_reason(exc: OSError) -> str:
    """The reason a disk error gives, in words ("No space left on device")."""
    return exc.strerror or next((w for w in _DISK_WORDS if w in str(exc)), str(exc).splitlines()[0][:200])


def write_error(exc: OSError, path, operation: str) -> WriteError:
    return WriteError(path, operation, disk_reason(exc))


def remove_partial_files(directory: Path) -> None:
    """Delete what writers killed inside atomic_path left in ``directory`` (hold its lock first)."""
    for partial in Path(directory).glob(PARTIAL_PREFIX + "*"):
        if partial.is_dir():
            shutil.rmtree(partial)
        else:
            partial.unlink()


@contextlib.contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it into place on success.

    A crash leaves at most a ``.tmp-*`` file, never a partial file under the final name.
    Works for files and for directories (the caller creates what it needs).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{PARTIAL_PREFIX}{final.name}.", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    operation = f"writing {tmp.name}"
    try:
        yield tmp
        if final.is_dir() and tmp.is_dir():
            shutil.rmtree(final)
        operation = f"renaming {tmp.name} into place"
        os.replace(tmp, final)
    except OSError as exc:
        if disk_error(exc):
            raise write_error(exc, final, operation) from None
        raise
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_json(path: Path | str, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def sha256_json(obj, length: int | None = None) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys; other objects by ``str``): the one way a
    config or key is hashed. ``length`` keeps that many hex digits."""
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:length] if length else digest


def unreadable_parquet(path, exc: Exception) -> UserError:
    """The one line for a file that is not readable Parquet (corrupt, truncated, another format)."""
    return UserError(f"{path} is not a readable Parquet file: {str(exc).splitlines()[0][:200]}")


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def require_file(path: Path | str, what: str = "") -> Path:
    """``path`` as a Path when it is a file; otherwise one line saying what it is instead
    (``what``, e.g. "recipe", names the input in the message)."""
    path = Path(path)
    if path.is_file():
        return path
    name = f"{what} {path}" if what else str(path)
    if path.is_dir():
        raise UserError(f"{name} is a directory; pass a file")
    raise UserError(f"{name} does not exist")


def check_output_path(path: Path | str, directory: bool = False) -> None:
    """Refuse an output path that cannot be written: under a file, or a file where a folder
    is wanted (and the reverse)."""
    path = Path(path)
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"cannot write {path}: {parent} is a file, not a folder")
    if directory and path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file; the output here is a folder")
    if not directory and path.is_dir():
        raise UserError(f"{path} is a folder; the output here is a file")


def check_output_free(path: Path | str, overwrite: bool) -> None:
    """Refuse an output file that cannot be written, or that exists, unless asked to replace it."""
    check_output_path(path)
    if Path(path).exists() and not overwrite:
        raise UserError(f"{path} already exists (pass {option_name('overwrite', True)} to replace it)")


@contextlib.contextmanager
def run_lock(output: Path | str) -> Iterator[None]:
    """Hold an exclusive lock for writing ``output``.

    Uses ``flock`` on ``.<name>.lock`` beside ``output``: the kernel drops it when the holder
    dies, so a killed run never leaves the output locked forever. Only the holder removes the
    file, while it still holds it; a process that opened the file before that and locks it
    afterwards finds the path gone or another file there, and tries again, so two processes
    never both hold a lock on ``output``. A refused process leaves the file alone.
    """
    import fcntl

    output = Path(output)
    lock_path = output.parent / f".{output.name}.lock"
    while True:
        handle = _open_lock(output, lock_path)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise UserError(f"{output} is being written by another energytools process") from None
        if _same_file(handle, lock_path):
            break
        handle.close()  # the holder before us removed it after we opened it: that lock guards nothing
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock_path.unlink()  # still held: whoever opened it meanwhile sees it gone, above
        handle.close()


def _open_lock(output: Path, lock_path: Path):
    """The lock file, opened (created) for locking; a folder that cannot be written is named
    as the output the user asked for, not as the lock file."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        return open(lock_path, "a")
    except OSError as exc:
        if not disk_error(exc):
            raise
        raise UserError(f"cannot write {output}: {disk_reason(exc)} (its folder {output.parent} cannot be "
                        f"written); fix the permissions or choose another {option_name('out')}") from None


def _same_file(handle, path: Path) -> bool:
    """Whether the open ``handle`` is the file ``path`` names now."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(handle.fileno())
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)
