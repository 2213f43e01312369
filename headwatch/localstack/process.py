"""Service processes: each in its own process group, logged to a file, stopped with nothing left.

A process is identified by its pid and its start time (from /proc), so a pid the kernel has since
given to an unrelated program is never signalled.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ProcessHandle:
    """A process this stack started: pid, kernel start time and the file its output goes to."""

    name: str
    pid: int
    start_ticks: int
    log_path: Path
    # The Popen object when this process started it; kept so it is reaped, never serialised.
    popen: subprocess.Popen[bytes] | None = field(default=None, compare=False, repr=False)


def start_ticks_of(pid: int) -> int | None:
    """Return the kernel start time of `pid` in clock ticks, or None when no such live process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in {"Z", "X"}:  # exited, waiting to be reaped
        return None
    return int(fields[19])


def log_tail(log_path: Path, lines: int = 40) -> str:
    """Return the last `lines` lines of a log file, or a note that it is missing or empty."""
    try:
        with open(log_path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"(no log at {log_path}: {exc.strerror})"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else f"({log_path} is empty)"


def spawn(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    *,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    die_with_parent: bool = False,
) -> ProcessHandle:
    """Start `argv` in a new session with stdout and stderr appended to `log_path`.

    With `die_with_parent`, the kernel kills the process when the starting thread exits
    (PR_SET_PDEATHSIG), so a test session that is killed leaves no service behind.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if die_with_parent else None,
        )
    ticks = start_ticks_of(popen.pid)
    logger.info("started %s pid=%s log=%s", name, popen.pid, log_path)
    return ProcessHandle(name, popen.pid, ticks if ticks is not None else -1, log_path, popen)


def is_running(handle: ProcessHandle) -> bool:
    """Return whether the process of `handle` is alive and is the one this stack started."""
    if handle.popen is not None and handle.popen.poll() is not None:
        return False
    ticks = start_ticks_of(handle.pid)
    return ticks is not None and (handle.start_ticks < 0 or ticks == handle.start_ticks)


def exit_status(handle: ProcessHandle) -> int | None:
    """Return the exit status when this process started it and it has exited, else None."""
    return handle.popen.poll() if handle.popen is not None else None


def stop(handle: ProcessHandle, timeout_seconds: float = 20.0) -> None:
    """Stop the process group of `handle`: SIGTERM, then SIGKILL after `timeout_seconds`."""
    if not is_running(handle):
        _reap(handle)
        return
    for sig, wait_seconds in ((signal.SIGTERM, timeout_seconds), (signal.SIGKILL, 10.0)):
        _signal_group(handle, sig)
        if _wait_gone(handle, wait_seconds):
            break
        logger.warning("%s pid=%s still running %.0fs after %s", handle.name, handle.pid,
                       wait_seconds, sig.name)  # fmt: skip
    _reap(handle)
    logger.info("stopped %s pid=%s", handle.name, handle.pid)


def _signal_group(handle: ProcessHandle, sig: signal.Signals) -> None:
    # start_new_session made the service the leader of its own group: pgid == pid.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(handle.pid, sig)


def _wait_gone(handle: ProcessHandle, timeout_seconds: float) -> bool:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if not is_running(handle) and not _group_alive(handle.pid):
            return True
        time.sleep(0.05)
    return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A group whose only member is an unreaped zombie of ours still "exists"; it is gone for us.
    return any(_pgid_of(pid) == pgid for pid in _live_pids())


def _live_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and start_ticks_of(int(p))]


def _pgid_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[2])


def _reap(handle: ProcessHandle) -> None:
    if handle.popen is not None:
        try:
            handle.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            logger.warning("%s pid=%s could not be reaped", handle.name, handle.pid)


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
