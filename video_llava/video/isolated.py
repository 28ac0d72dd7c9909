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
from multiprocessing.connection import Connection

from video_llava.video.decode import (
    DecodeOptions,
    SampledVideo,
    VideoDecodeError,
    VideoInput,
    as_source,
    sample_video,
)


def _worker_main(conn: Connection) -> None:
    """Worker loop: receive (source, options), reply ("ok", SampledVideo) or ("error", reason)."""
    if not os.environ.get("VIDEO_LLAVA_DECODER_STDERR"):
        # decord/FFmpeg log to fd 2 from C++; the reasons reach the caller in the error instead.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        source, options = job
        try:
            reply = ("ok", sample_video(source, options))
        except VideoDecodeError as exc:
            reply = ("error", exc.reason)
        except Exception as exc:  # report, never hide: the parent turns this into a VideoDecodeError
            reply = ("error", f"decoder failed: {type(exc).__name__}: {exc}")
        conn.send(reply)


class _Worker:
    def __init__(self, ctx: mp.context.BaseContext):
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child,), daemon=True, name="video-decode")
        self.process.start()
        child.close()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class IsolatedDecoder:
    """A pool of ``workers`` decode processes; ``decode`` blocks until a worker is free.

    Thread-safe: each call borrows one worker. Use as a context manager or call ``close()``.
    """

    def __init__(self, workers: int = 1, timeout_s: float = 60.0):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        # spawn: forking a process that holds threads (Ray, torch, uvicorn) can deadlock the child.
        self._ctx = mp.get_context("spawn")
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        for _ in range(workers):
            self._add_worker()

    def _add_worker(self) -> None:
        worker = _Worker(self._ctx)
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

    def decode(self, video: VideoInput, options: DecodeOptions | None = None) -> SampledVideo:
        """Like ``decode.sample_video`` but isolated and time-limited. Raises ``VideoDecodeError``."""
        if self._closed:
            raise RuntimeError("IsolatedDecoder is closed")
        source = as_source(video)  # cheap checks (missing/empty file) in this process
        options = options or DecodeOptions()
        worker = self._idle.get()
        try:
            worker.conn.send((source, options))
            if not worker.conn.poll(self.timeout_s):
                self._retire(worker)
                worker = None
                raise VideoDecodeError(f"decoding took longer than {self.timeout_s:g} s and was stopped")
            status, payload = worker.conn.recv()
        except (EOFError, OSError):
            code = worker.process.exitcode if worker is not None else None
            if worker is not None:
                self._retire(worker)
                worker = None
            raise VideoDecodeError(f"the decoder crashed on this input (exit code {code}); the file is corrupt")
        finally:
            if worker is not None:
                self._idle.put(worker)
        if status == "error":
            raise VideoDecodeError(payload)
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


__all__ = ["IsolatedDecoder", "decode_video"]
