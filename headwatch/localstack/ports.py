"""Port choice: the preferred port when it is free, otherwise a free one (or a clear error)."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Collection

from headwatch.localstack.errors import PortUnavailableError, StackConfigError

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"


def is_port_free(port: int, host: str = HOST) -> bool:
    """Return whether a listener could bind `host:port` now (SO_REUSEADDR, as the services do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = HOST) -> int:
    """Return a port the kernel reports free on `host` (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


def choose_port(
    preferred: int,
    *,
    strict: bool = False,
    taken: Collection[int] = (),
    is_free: Callable[[int], bool] = is_port_free,
    pick_free: Callable[[], int] = free_port,
    attempts: int = 20,
    setting: str = "HEADWATCH_STACK_KAFKA_PORT",
) -> int:
    """Return `preferred` if it is free, else a free port (0 asks for any free port).

    `taken` holds ports already promised to other services of the same stack, which are not
    listening yet. With `strict`, a busy preferred port raises instead of falling back. No
    process is ever stopped to free a port; the error names `setting`, which chooses the port.
    """
    if not 0 <= preferred <= 65535:
        raise StackConfigError(f"expected a port in 0..65535, got {preferred}")
    if preferred:
        if preferred not in taken and is_free(preferred):
            return preferred
        if strict:
            raise PortUnavailableError(
                f"port {preferred} on {HOST} is in use by another process; stop it or choose "
                f"another port ({setting}=0 for any free port)"
            )
    for _ in range(attempts):
        port = pick_free()
        if port not in taken:
            if preferred:
                logger.info("port %s is busy, using free port %s instead", preferred, port)
            return port
    raise PortUnavailableError(
        f"expected a free port outside {sorted(taken)}, got none after {attempts} tries"
    )
