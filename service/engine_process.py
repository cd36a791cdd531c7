"""The model passes of one worker lane in a child process of their own (`SALIENCY_WORKER=process`).

Why: every torch op releases the GIL while it runs and has to take it back when it returns. In one process
the worker's passes queue for the GIL behind the HTTP side (event loop, decoding, encoding), and a pass beside
a thread running Python all the time is many times slower (bench/gil.py; docs/benchmarks.md, "Service under
load"). A GPU pass is hundreds of microsecond launches, each one such round trip. A child process has a GIL of
its own.

The split: the server process keeps the queue, batching, deadlines and the failure policy (the same
`WorkerPool`), and its models on the CPU for validation and preprocessing. The child boots the engine core
(service/engine_core.py) on the device and runs `EngineCore.run_batch` for each batch it is sent. Pixels and
maps cross through a file in /dev/shm that both map (service/shared_arrays.py; through the pipe when that has
no room); the rest, progress and errors (service/errors.py, pickled whole) are messages on the pipe. A
child that dies is started again for the next batch; the batch it died in fails with the exit code, and
the pool reruns its images one by one so only the one that kills it fails.
"""
from __future__ import annotations

import ctypes
import dataclasses
import logging
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from .engine import ImageExplanation
from .engine_core import Batch
from .errors import Cancelled, EngineCrashed, ServiceError
from .methods import Progress
from .metrics import device_memory
from .shared_arrays import ArrayReader, ArrayWriter, remove_files_of

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 600.0  # loading and calibrating the models (large models on a cold disk take minutes)


class EngineProcess:
    """A child process owning the device for one lane; `run` is called by that lane's worker thread only."""

    def __init__(self, settings_json: str, name: str):
        self.settings_json, self.name = settings_json, name
        self._context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        # Set by the server side, read by the child between passes: one byte of shared memory (an Event would
        # be semaphores, which the resource tracker reports as leaked when the server exits without collecting
        # us).
        self._cancel = self._context.RawValue(ctypes.c_bool, False)
        self._lock = threading.Lock()  # start/stop against run's restart
        self._stopped = False
        self.pass_batch: dict[str, int] = {}
        self.device_memory = 0.0  # allocated device memory (CUDA) or RSS (CPU) the child reported last
        self.starts = 0
        self._inputs, self._outputs = ArrayWriter("in"), ArrayReader()

    @property
    def restarts(self) -> int:
        return max(0, self.starts - 1)

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> dict[str, int]:
        """Spawn the child and wait until its models are loaded; RuntimeError if they could not be."""
        with self._lock:
            if self._stopped:
                raise RuntimeError(f"{self.name} is stopped")
            self._spawn_locked()
            return self.pass_batch

    def _spawn_locked(self) -> None:
        self._close_locked()
        ours, theirs = self._context.Pipe()
        process = self._context.Process(target=serve, args=(theirs, self._cancel, self.settings_json),
                                        name=self.name, daemon=True)
        process.start()
        theirs.close()  # the child holds its end: EOF here when it exits
        self._process, self._conn = process, ours
        self.starts += 1
        if not ours.poll(_START_TIMEOUT_S):
            self._close_locked()
            raise RuntimeError(f"{self.name}: the engine process did not load its models in "
                               f"{_START_TIMEOUT_S:.0f} s")
        try:
            message = ours.recv()
        except (EOFError, OSError):
            code = self._exit_code()
            self._close_locked()
            raise RuntimeError(f"{self.name}: the engine process exited with code {code} "
                               "while loading") from None
        if message[0] != "ready":
            self._close_locked()
            raise RuntimeError(f"{self.name}: the engine process could not load its models: {message[1]}")
        self.pass_batch, self.device_memory = message[1], message[2]
        log.info("%s: engine process %d ready (pass batch %s)", self.name, process.pid, self.pass_batch)

    def run(self, batch: Batch, progress: Progress) -> list[ImageExplanation]:
        """Run `batch` in the child. `progress(done, total)` may raise to cancel; the child then stops at its
        next pass and this raises what `progress` raised."""
        with self._lock:
            if self._stopped:
                raise RuntimeError(f"{self.name} is stopped")
            if not self.alive:
                log.warning("%s: engine process gone (exit code %s), starting another", self.name,
                            self._exit_code())
                self._spawn_locked()
            conn = self._conn
            self._cancel.value = False
        assert conn is not None, "a spawned engine process has a pipe"
        # the pixels travel apart, through shared memory when it has room
        conn.send((dataclasses.replace(batch, pixels=_NO_PIXELS),
                   pack(self._inputs, [np.asarray(batch.pixels)])))
        stop_reason: BaseException | None = None
        try:
            while True:
                message = conn.recv()
                kind = message[0]
                if kind == "progress":
                    if stop_reason is None:
                        try:
                            progress(message[1], message[2])
                        except BaseException as exc:  # noqa: BLE001 - re-raised once the child has stopped
                            stop_reason = exc
                            self._cancel.value = True
                    continue
                if kind == "done":
                    _, results, arrays, self.device_memory = message
                    return from_wire(results, unpack(self._outputs, arrays))
                _, error, self.device_memory = message
                if isinstance(error, Cancelled) and stop_reason is not None:
                    raise stop_reason
                raise error
        except (EOFError, OSError):
            code = self._exit_code()
            raise EngineCrashed(f"the engine process exited (code {code}) while running this batch; another "
                                f"engine process takes the next request") from None

    def stop(self, grace: float = 10.0) -> None:
        """Tell the child to exit; kill it after `grace` seconds. The pool has already waited for the batch in
        flight, so one still running here was given up on: it is cancelled at its next pass."""
        with self._lock:
            self._stopped = True
            process, conn = self._process, self._conn
        if process is None:
            return
        self._cancel.value = True
        try:
            if conn is not None:
                conn.send(None)
        except OSError:
            pass
        process.join(grace)
        if process.is_alive():
            process.kill()
            process.join(5)
        with self._lock:
            self._close_locked()
            try:
                self._inputs.close()
            except BufferError:  # a batch abandoned after the grace period still writes to it: unlink only
                if self._inputs.path is not None:
                    os.unlink(self._inputs.path)

    def _exit_code(self) -> int | None:
        if self._process is None:
            return None
        self._process.join(1.0)  # the pipe closes a moment before the process is reaped
        return self._process.exitcode

    def _close_locked(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._process is not None:
            if self._process.is_alive():
                self._process.kill()
                self._process.join(5)
            if self._process.pid is not None:
                remove_files_of(self._process.pid)  # its result file, when it could not delete it itself
        self._outputs.close()
        self._conn = None


_TENSOR_FIELDS = ("heatmap", "attribution", "sized_heatmap")
_NO_PIXELS = np.empty((0, 3, 0, 0), np.float32)
Packed = tuple[str, Any]  # ("shared", Shared) or ("inline", list of arrays)


def to_wire(results: list[ImageExplanation]) -> tuple[list[ImageExplanation], list[np.ndarray]]:
    """The results with each tensor replaced by its index in one list of arrays (which travels apart)."""
    arrays: list[np.ndarray] = []
    stripped = []
    for result in results:
        indexes: dict[str, Any] = {}  # tensor field -> its index in `arrays`
        for name in _TENSOR_FIELDS:
            tensor = getattr(result, name)
            if tensor is not None:
                indexes[name] = len(arrays)
                arrays.append(tensor.numpy())
        stripped.append(dataclasses.replace(result, **indexes))
    return stripped, arrays


def from_wire(results: list[ImageExplanation], arrays: list[np.ndarray]) -> list[ImageExplanation]:
    out = []
    for result in results:
        tensors: dict[str, Any] = {name: torch.from_numpy(arrays[getattr(result, name)])
                                   for name in _TENSOR_FIELDS if getattr(result, name) is not None}
        out.append(dataclasses.replace(result, **tensors))
    return out


def pack(writer: ArrayWriter, arrays: list[np.ndarray]) -> Packed:
    shared = writer.write(arrays)
    return ("shared", shared) if shared is not None else ("inline", arrays)


def unpack(reader: ArrayReader, packed: Packed) -> list[np.ndarray]:
    how, content = packed
    return reader.read(content) if how == "shared" else content


# ---------------------------------------------------------------------------------------------- the child
def serve(conn: Connection, cancel, settings_json: str) -> None:
    """The child's main: boot the engine core on the device, then run batches until told to stop or
    orphaned."""
    # Ctrl-C reaches the whole process group: the server stops us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from .engine_core import EngineCore
    from .settings import Settings

    settings = Settings.model_validate_json(settings_json)
    _exit_with_parent()
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        core = EngineCore.boot(settings, own_process=True)
        core.warm_up()  # in this thread, the one that runs the passes
    except Exception as exc:  # noqa: BLE001 - the server process reports it on /readyz
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    device = core.device
    conn.send(("ready", core.pass_batch, device_memory(device)))
    inputs, outputs = ArrayReader(), ArrayWriter("out")
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return  # the server process is gone
            if message is None:
                return
            batch, packed = message
            batch.pixels = unpack(inputs, packed)[0]
            try:
                conn.send(_run(core, batch, device, conn, cancel, outputs))
            except (BrokenPipeError, OSError):
                return
    finally:
        inputs.close()
        outputs.close()


def _exit_with_parent(interval: float = 1.0) -> None:
    """Exit when the server process is gone, even in the middle of a long batch (when idle, the pipe's EOF
    says so first). prctl's parent-death signal would fire when the *thread* that spawned us ends: not usable
    here."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _run(core, batch: Batch, device: torch.device, conn: Connection, cancel, outputs: ArrayWriter) -> tuple:
    last = 0.0

    def progress(done: int, total: int) -> None:
        nonlocal last
        if cancel.value:
            raise Cancelled()
        now = time.monotonic()
        if done >= total or now - last >= 0.05:  # at most ~20 reports a second cross the pipe
            last = now
            conn.send(("progress", done, total))

    try:
        stripped, arrays = to_wire(core.run_batch(batch, progress))
        return "done", stripped, pack(outputs, arrays), device_memory(device)
    except ServiceError as error:  # classified by the engine core; pickled whole
        return "error", error, device_memory(device)
