"""The port the serving processes share, reserved by their supervisor.

Why SO_REUSEPORT rather than one listening socket handed down to every process: each process
gets its own accept queue and the kernel spreads new connections across them evenly, where a
shared queue wakes every process for each connection and lets whichever wins take bursts of
them; and nothing needs passing between processes. The supervisor binds the port itself,
without listening (it never accepts, so the kernel never queues a connection for it): that
resolves port 0 to one port for all, and keeps the port theirs, not another program's, while
one of them restarts. It binds before it allows sharing, so a port that another program, or
another streamgate, already holds is refused as it would be for one process; only processes
of the same user can join the group after (the kernel's rule for SO_REUSEPORT). The cost:
connections queued on a process that crashes, not yet accepted, are reset (Linux 5.14+ hands
them to a sibling with net.ipv4.tcp_migrate_req=1).
"""

from __future__ import annotations

import socket


def reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """Bind `host:port` without listening, then let the processes bind it with SO_REUSEPORT;
    returns the socket (keep it open while they serve) and the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:  # as asyncio binds the processes' sockets
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))  # alone: refused if anyone holds it, SO_REUSEPORT or not
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock, sock.getsockname()[1]
