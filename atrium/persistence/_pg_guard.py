"""The guard between atrium and its embedded PostgreSQL (run as a script, stdlib only);
it guards the embedded Redis of ``run.py --workers`` the same way (``embedded_redis.py``).

    python _pg_guard.py LOG USER POSTGRES_ARGV...

Starts PostgreSQL (as USER when not empty, its output appended to LOG) as its own child,
and holds the read end of a
pipe from atrium on its stdin. It exits with the postmaster's status when the postmaster
ends, so atrium sees a crash as its child exiting. When stdin reaches end of file, because
atrium stopped it or atrium itself died (even by SIGKILL, as the kernel closes the pipe), it
shuts PostgreSQL down: fast (SIGINT), then immediate (SIGQUIT), then SIGKILL. Should the
guard itself be killed, the kernel sends PostgreSQL SIGINT (PR_SET_PDEATHSIG), so no path
leaves a postmaster running without its atrium.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import sys

_PR_SET_PDEATHSIG = 1
_FAST_STOP_SECONDS = 20.0
_IMMEDIATE_STOP_SECONDS = 10.0


def _die_with_guard() -> None:
    # Runs in the child after it switched user (a credential change clears the setting).
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGINT)


def _status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _stop(postmaster: subprocess.Popen[bytes]) -> int:
    for sig, wait in (
        (signal.SIGINT, _FAST_STOP_SECONDS),
        (signal.SIGQUIT, _IMMEDIATE_STOP_SECONDS),
    ):
        postmaster.send_signal(sig)
        try:
            return _status(postmaster.wait(wait))
        except subprocess.TimeoutExpired:
            continue
    postmaster.kill()
    return _status(postmaster.wait())


def main(argv: list[str]) -> int:
    log, user, command = argv[0], argv[1] or None, argv[2:]
    with open(log, "ab") as output:
        postmaster = subprocess.Popen(
            command,
            user=user,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            preexec_fn=_die_with_guard,
        )
    pidfd = os.pidfd_open(postmaster.pid)
    poller = select.poll()
    poller.register(sys.stdin.fileno(), select.POLLIN | select.POLLHUP)
    poller.register(pidfd, select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd == pidfd:
                return _status(postmaster.wait())
            if not os.read(fd, 512):
                return _stop(postmaster)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
