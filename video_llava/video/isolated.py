"""Decode videos in worker processes with a time limit, so a hostile file can neither hang nor crash us.

decord and FFmpeg are C code: a crafted or broken file can segfault them or loop forever, and a thread
cannot be killed. The stdlib ``ProcessPoolExecutor`` cannot cancel a running task either, and a crashed
worker breaks the whole pool, so this module keeps its own small set of worker processes: on a timeout
the worker is killed, on a crash it is replaced, and the caller gets a ``VideoDecodeError`` either way.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import time
from multiprocessing.connection import Connection

from video_llava.video.decode import (
    DecodeOptions,
    SampledVideo,
    VideoDecodeError,
    VideoInput,
    as_source,
    sample_video,
)
from video_llava.video.image import DecodedImage, ImageDecodeError, ImageOptions, load_image

STARTUP_TIMEOUT_S = 120.0  # spawn, import the caller's main module again, then ours


class DecodersBusyError(RuntimeError):
    """No decoder worker came free within the wait allowed: the service is at capacity, retry later."""


class DecodeCancelledError(RuntimeError):
    """The caller cancelled the decode (its client left, or a sibling medium failed); its worker was replaced."""


class DecoderStartError(RuntimeError):
    """A decoder worker process could not start: a fault of the environment or the calling script, not of a video."""


OUT_OF_MEMORY = "out_of_memory"  # a worker's reply status: it hit its memory limit and must be replaced


def _limit_memory(memory_mb: int | None) -> None:
    """Cap this process's data (heap and private writable mappings) at ``memory_mb``: an allocation past it fails
    (MemoryError, or a decoder library aborting), and the parent replaces the worker. Set after the decoders are
    imported, so the limit bounds what one video can make the worker allocate, not the libraries."""
    if not memory_mb:
        return
    import resource

    import av  # noqa: F401
    import decord  # noqa: F401
    import PIL.Image  # noqa: F401

    limit = int(memory_mb) * 2**20
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def _worker_main(conn: Connection, memory_mb: int | None = None) -> None:
    """Worker loop: say ("ready", pid), then receive (source, options), reply ("ok", SampledVideo) or ("error", error)."""
    if not os.environ.get("VIDEO_LLAVA_DECODER_STDERR"):
        # decord/FFmpeg log to fd 2 from C++; the reasons reach the caller in the error instead.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    _limit_memory(memory_mb)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        source, options = job
        try:
            if isinstance(options, ImageOptions):
                reply = ("ok", load_image(source, options))
            else:
                reply = ("ok", sample_video(source, options))
        except VideoDecodeError as exc:
            reply = ("error", exc)
        except MemoryError:
            reply = (OUT_OF_MEMORY, None)
        except Exception as exc:  # report, never hide: the parent turns this into a VideoDecodeError
            reply = ("error", f"decoder failed: {type(exc).__name__}: {exc}")
        conn.send(reply)


class _Worker:
    def __init__(self, ctx: mp.context.BaseContext, memory_mb: int | None = None):
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child, memory_mb), daemon=True, name="video-decode")
        self.process.start()
        child.close()
        self.ready = False  # set once its "ready" arrived; started workers are awaited lazily, at their first job

    def await_ready(self) -> None:
        """Wait for the worker's "ready"; ``DecoderStartError`` if it exits (or hangs) before saying it."""
        try:
            if self.conn.poll(STARTUP_TIMEOUT_S):
                self.conn.recv()
                self.ready = True
                return
            reason = f"did not start within {STARTUP_TIMEOUT_S:g} s"
        except (EOFError, OSError):
            self.process.join(timeout=5)
            reason = f"exited with code {self.process.exitcode} before it was ready"
        raise DecoderStartError(
            f"a video decoder worker process {reason}: it could not start, whatever the video. Run from a script, "
            "the script must guard its entry point with `if __name__ == \"__main__\":` (the workers are started with "
            "multiprocessing's spawn, which imports the script again); its own error is printed above"
        )

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class IsolatedDecoder:
    """A pool of ``workers`` decode processes; ``decode`` blocks until a worker is free.

    Thread-safe: each call borrows one worker. Use as a context manager or call ``close()``.
    """

    def __init__(self, workers: int = 1, timeout_s: float = 60.0, memory_mb: int | None = None):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb  # per worker; None: unlimited
        # spawn: forking a process that holds threads (Ray, torch, uvicorn) can deadlock the child.
        self._ctx = mp.get_context("spawn")
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        for _ in range(workers):
            self._add_worker()

    def _add_worker(self) -> None:
        worker = _Worker(self._ctx, self.memory_mb)
        with self._lock:
            self._all.append(worker)
        self._idle.put(worker)

    def _retire(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            if worker in self._all:
                self._all.remove(worker)
            closed = self._closed
        if not closed:
            self._add_worker()

    def decode(self, video: VideoInput, options: DecodeOptions | None = None, cancel: threading.Event | None = None,
               wait_s: float | None = None) -> SampledVideo:
        """Like ``decode.sample_video`` but isolated and time-limited. Raises ``VideoDecodeError``.

        ``cancel``: set it to stop the decode (its worker is killed and replaced; ``DecodeCancelledError``);
        ``wait_s``: how long to wait for a free worker (``DecodersBusyError`` after; None: as long as it takes).
        """
        source = as_source(video)  # cheap checks (missing/empty file) in this process
        return self._run(source, options or DecodeOptions(), VideoDecodeError, cancel, wait_s)

    def decode_image(self, data: bytes, options: ImageOptions | None = None, cancel: threading.Event | None = None,
                     wait_s: float | None = None) -> DecodedImage:
        """Like ``image.load_image`` but isolated and time-limited. Raises ``ImageDecodeError``; see ``decode``."""
        if not data:
            raise ImageDecodeError("the image is empty (0 bytes)")
        return self._run(data, options or ImageOptions(), ImageDecodeError, cancel, wait_s)

    def _wait_for_result(self, worker: _Worker, cancel: threading.Event | None) -> bool:
        """Whether the worker's reply arrived within the timeout; ``DecodeCancelledError`` once ``cancel`` is set."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            if cancel is not None and cancel.is_set():
                raise DecodeCancelledError("the decode was cancelled")
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if worker.conn.poll(min(left, 0.05) if cancel is not None else left):
                return True

    def _run(self, source, options, error: type[VideoDecodeError], cancel: threading.Event | None = None,
             wait_s: float | None = None):
        if self._closed:
            raise RuntimeError("IsolatedDecoder is closed")
        try:
            worker = self._idle.get(timeout=wait_s)
        except queue.Empty:
            raise DecodersBusyError(f"all {len(self._all)} decoders stayed busy for {wait_s:g} s") from None
        if not worker.ready:
            try:
                worker.await_ready()
            except DecoderStartError:
                self._retire(worker)
                raise
        try:
            worker.conn.send((source, options))
            try:
                arrived = self._wait_for_result(worker, cancel)
            except DecodeCancelledError:
                self._retire(worker)  # it may be deep in a long decode: a fresh worker, not a wait
                worker = None
                raise
            if not arrived:
                self._retire(worker)
                worker = None
                raise error(f"decoding took longer than {self.timeout_s:g} s and was stopped")
            status, payload = worker.conn.recv()
            if status == OUT_OF_MEMORY:  # its heap may be fragmented or a library left in a bad state: a fresh one
                self._retire(worker)
                worker = None
                raise error(f"decoding needed more than the decoder's memory limit of {self.memory_mb} MB",
                            "decode_out_of_memory")
        except (EOFError, OSError):
            code = worker.process.exitcode if worker is not None else None
            if worker is not None:
                self._retire(worker)
                worker = None
            limit = f" or needed more than the decoder's {self.memory_mb} MB" if self.memory_mb else ""
            raise error(f"the decoder crashed on this input (exit code {code}): the file is corrupt{limit}")
        finally:
            if worker is not None:
                self._idle.put(worker)
        if status == "error":
            raise payload if isinstance(payload, VideoDecodeError) else error(str(payload))
        return payload

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers = list(self._all)
            self._all.clear()
        for worker in workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
            worker.process.join(timeout=2)
            worker.kill()

    def __enter__(self) -> "IsolatedDecoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def worker_pids(self) -> list[int]:
        with self._lock:
            return [w.process.pid for w in self._all if w.process.pid is not None and w.process.is_alive()]


def decode_video(video: VideoInput, options: DecodeOptions | None = None, timeout_s: float = 60.0) -> SampledVideo:
    """One-shot isolated decode (starts and stops a worker: ~1 s overhead; keep an ``IsolatedDecoder`` for many)."""
    with IsolatedDecoder(workers=1, timeout_s=timeout_s) as decoder:
        return decoder.decode(video, options)


def decode_image_file(path: str, options: ImageOptions | None = None, timeout_s: float = 60.0) -> DecodedImage:
    """One-shot isolated image decode of a file (as ``decode_video``)."""
    try:
        data = open(path, "rb").read()
    except OSError as exc:
        raise ImageDecodeError(f"cannot read {path}: {exc.strerror or exc}") from exc
    with IsolatedDecoder(workers=1, timeout_s=timeout_s) as decoder:
        return decoder.decode_image(data, options)


__all__ = ["DecoderStartError", "IsolatedDecoder", "decode_image_file", "decode_video"]
