"""Helpers for tests that start Ray clusters with `ray start`: free ports, and stopping only their own processes."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from video_llava.ray_runtime import free_port

__all__ = ["free_port", "pids", "stop_cluster"]


def pids(*markers: str, program: str = "") -> list[int]:
    """PIDs of processes whose command line contains every marker (and whose program name contains ``program``)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if program in cmd.split(" ")[0] and all(m in cmd for m in markers):
                found.append(int(proc.name))
    return found


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(proc.name))
    return tree


def stop_cluster(gcs_port: int) -> None:
    """Kill the Ray processes of the cluster whose GCS listens on ``gcs_port``: those that name it on their command
    line, and their descendants (the dashboard agent renames itself and would otherwise outlive the cluster, holding
    its port against the next cluster's agent).

    ``ray stop`` would stop every Ray instance on the machine, a developer's own included.
    """
    tree, found = _children(), []
    todo = pids(f":{gcs_port}") + pids(f"={gcs_port}")
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.append(pid)
            todo += tree.get(pid, [])
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
