"""Arrays handed between the server process and an engine process through a file in /dev/shm that both map.

Through the Unix socket of a `multiprocessing.Pipe` arrays cross slowly, one request's maps alone taking
milliseconds (docs/benchmarks.md, section "Process worker"), and a GPU batch moves tens of MB each way.
Through a mapped file they cost one memcpy on each side. Each writer owns one file and reuses it batch after
batch: the protocol is synchronous, so the reader has copied the arrays out before the writer's next batch.
It grows (a new file) when a batch needs more. The space is reserved with posix_fallocate, so a full /dev/shm
(Docker's default is 64 MB) is an OSError here rather than a SIGBUS on a later write; the caller then sends
the arrays through the pipe instead.
"""
from __future__ import annotations

import contextlib
import glob
import itertools
import logging
import mmap
import os
import tempfile

import numpy as np

log = logging.getLogger(__name__)

Spec = tuple[int, tuple[int, ...], str]  # (byte offset, shape, dtype)
Shared = tuple[str, list[Spec]]  # (path, one spec per array)

_ALIGN = 64
_MIN_BYTES = 4 * 2**20
_names = itertools.count()


def shm_dir() -> str:
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return "/dev/shm"
    return tempfile.gettempdir()


def remove_files_of(pid: int) -> None:
    """Delete the files a process left behind (it was killed before it could)."""
    for path in glob.glob(os.path.join(shm_dir(), f"saliency-*-{pid}-*")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class ArrayWriter:
    def __init__(self, tag: str):
        self.tag = tag
        self.path: str | None = None
        self.capacity = 0
        self._map: mmap.mmap | None = None

    def write(self, arrays: list[np.ndarray]) -> Shared | None:
        """Copy `arrays` into the file: (path, specs), or None when the space could not be had."""
        offsets, total = [], 0
        for array in arrays:
            offsets.append(total)
            total += -(-array.nbytes // _ALIGN) * _ALIGN
        if total > self.capacity:
            try:
                self._grow(max(total, 2 * self.capacity, _MIN_BYTES))
            except OSError as exc:
                log.warning("no room for %d bytes in %s (%s): arrays go through the pipe", total, shm_dir(),
                            exc)
                return None
        for array, offset in zip(arrays, offsets, strict=True):
            np.ndarray(array.shape, array.dtype, buffer=self._map, offset=offset)[...] = array
        specs = [(offset, array.shape, array.dtype.str)
                 for array, offset in zip(arrays, offsets, strict=True)]
        # self.path is None only when the writer has no file (none made yet, or closed) and this batch needs
        # none (every array empty); a reader that has mapped no file builds those from their specs alone.
        return self.path, specs  # type: ignore[return-value]  # str for every batch that holds data

    def _grow(self, size: int) -> None:
        self.close()
        path = os.path.join(shm_dir(), f"saliency-{self.tag}-{os.getpid()}-{next(_names)}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
            self._map = mmap.mmap(fd, size)
        except OSError:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        self.path, self.capacity = path, size

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self.path, self.capacity = None, 0


class ArrayReader:
    """Maps the writer's current file (again only when it grew into a new one) and copies arrays out of it."""

    def __init__(self):
        self._path: str | None = None
        self._map: mmap.mmap | None = None

    def read(self, shared: Shared) -> list[np.ndarray]:
        path, specs = shared
        if path != self._path:
            self.close()
            fd = os.open(path, os.O_RDONLY)
            try:
                self._map = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            self._path = path
        return [np.ndarray(shape, np.dtype(dtype), buffer=self._map, offset=offset).copy()
                for offset, shape, dtype in specs]

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        self._path = None
