"""Checks of paths Sieve is asked to write to, made before any work, and of the processes that left files behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def file_version(found: os.stat_result) -> tuple[int, int, int, int]:
    """Which file a stat names, and which version of it (device, inode, size, modification time): another inode,
    size or time is another file's content, or the same file's rewritten."""
    return (found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns)


def nearest_existing_parent(path: Path) -> Path | None:
    """The closest ancestor of ``path`` that exists (as given: relative stays relative), or None. A file there
    means ``path`` can never be created; a directory is where it would be written."""
    return next((parent for parent in path.parents if parent.exists()), None)


def process_started(pid: int) -> float | None:
    """When process ``pid`` started, in Unix seconds (Linux /proc; None where that cannot be read)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time in clock ticks
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def process_exists(pid: int, since: float | None = None) -> bool:
    """Whether the process ``pid`` (which made a file or directory at ``since``, Unix seconds) still runs: a process
    with that pid that started after that is another one (the pid was reused). This process, and pids not ours to
    judge (0 or less), count as running."""
    if pid <= 0 or pid == os.getpid():
        return True  # not ours to judge / a build in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: it exists, as another user's process
        pass
    started = process_started(pid) if since is not None else None
    return started is None or started <= since + 2.0  # 2 s: the clock-tick and boot-time rounding


def fsync_path(path: Path) -> bool:
    """Write a file's (or a directory's entries') changes out to disk, by path: False when it cannot be opened
    (nothing to flush from here); OSError when the flush fails, but on a file system that cannot fsync one (EINVAL,
    EROFS), where there is nothing to wait for."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EROFS):
            raise
    finally:
        os.close(fd)
    return True
