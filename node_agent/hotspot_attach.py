"""The HotSpot dynamic-attach protocol, spoken by a short-lived helper process.

What `jcmd PID COMMAND` does, without a JDK on the node and for JVMs in containers:

1. If the JVM's attach listener is not up (no `/tmp/.java_pid<NSPID>` socket), create
   `/tmp/.attach_pid<NSPID>` and send SIGQUIT: the JVM's signal handler sees the file and
   starts the listener, which creates the socket.
2. Connect, send `1\\0jcmd\\0<COMMAND>\\0\\0\\0` (protocol 1: a command and three arguments),
   and read the reply: a status line (0 is success) then the command's output.

Everything lives in the JVM's mount namespace, named with the pid the JVM sees: the agent
goes through /proc/PID/root/tmp. The JVM only answers peers with its own effective uid and
gid (or its root): a JVM in a user namespace (a rootless container) refuses the host's
root, which is not even allowed to create files in that container's /tmp. So the helper
acts as the JVM's uid and gid before it touches any of the JVM's files. That needs its own
process: set*id would change every thread of the agent. The helper starts as the agent's
own Python (`-I -S`: stdlib only, ~20 ms), so it needs no rights to run the interpreter
after dropping them, and it only ever signals the process it pinned with a pidfd.

Run by the agent (see `attach`); usage: hotspot_attach.py PID NSPID START_TIME TIMEOUT CMD...
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

_MAX_REPLY_BYTES = 16 << 20
_POLL_S = 0.05


class AttachError(Exception):
    """Attaching failed; the message says why in a few words."""


def attach(
    pid: int, nspid: int, start_time: int, commands: list[str], timeout_s: float
) -> list[tuple[int, str]]:
    """Run diagnostic commands in a HotSpot JVM; (status, output) per command.

    Blocks up to about timeout_s: call it off the agent's main thread. Raises AttachError.
    """
    argv = [sys.executable, "-I", "-S", __file__, str(pid), str(nspid), str(start_time)]
    try:
        done = subprocess.run(
            [*argv, str(timeout_s), *commands],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            env={},
            timeout=timeout_s + 5,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise AttachError("timed out") from exc
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        raise AttachError(lines[-1] if lines else f"helper exited with {done.returncode}")
    return [(code, text) for code, text in json.loads(done.stdout)]


def socket_path(pid: int, nspid: int) -> str:
    return f"/proc/{pid}/root/tmp/.java_pid{nspid}"


def catches_sigquit(status: str) -> bool:
    """Whether a process (its /proc/PID/status) handles SIGQUIT. A JVM does once its signal
    handlers are installed, unless run with -Xrs; to anything else SIGQUIT is fatal."""
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGQUIT - 1) & 1)
    return False


def _effective_ids(status: str) -> tuple[int, int]:
    ids = {}
    for line in status.splitlines():
        key, _, values = line.partition(":")
        if key in ("Uid", "Gid"):
            ids[key] = int(values.split()[1])  # real, effective, saved, filesystem
    return ids["Uid"], ids["Gid"]


def _act_as(uid: int, gid: int) -> None:
    if (os.geteuid(), os.getegid()) == (uid, gid):
        return
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise AttachError(f"cannot act as the JVM's uid {uid}: {exc.strerror}") from exc


def _run(
    pid: int, nspid: int, start_time: int, commands: list[str], timeout_s: float
) -> list[tuple[int, str]]:
    deadline = time.monotonic() + timeout_s
    # The pidfd pins the process: if the pid is reused, signals fail instead of hitting
    # another process. Checked to be the JVM the agent saw after it is pinned.
    pidfd = os.pidfd_open(pid)
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as f:
            status = f.read()
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            if int(f.read().rsplit(")", 1)[1].split()[19]) != start_time:
                raise AttachError("the process exited")
        _act_as(*_effective_ids(status))
        path = socket_path(pid, nspid)
        if not os.path.exists(path):
            _start_listener(pid, nspid, pidfd, status, path, deadline)
        return [_command(path, command, deadline) for command in commands]
    finally:
        os.close(pidfd)


def _start_listener(
    pid: int, nspid: int, pidfd: int, status: str, path: str, deadline: float
) -> None:
    if not catches_sigquit(status):
        raise AttachError("the JVM does not handle SIGQUIT (-Xrs, or still starting)")
    trigger = f"/proc/{pid}/root/tmp/.attach_pid{nspid}"
    try:
        # O_NOFOLLOW | O_EXCL: a link planted in the container's /tmp cannot redirect it.
        os.close(os.open(trigger, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        created = True
    except FileExistsError:
        created = False  # someone else is attaching: their file serves us too
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGQUIT)
        # Like jcmd: one more SIGQUIT halfway, in case the first came too early.
        resend_at = time.monotonic() + (deadline - time.monotonic()) / 2
        while not os.path.exists(path):
            if time.monotonic() >= deadline:
                raise AttachError("the JVM did not start its attach listener")
            if resend_at and time.monotonic() >= resend_at:
                signal.pidfd_send_signal(pidfd, signal.SIGQUIT)
                resend_at = 0
            time.sleep(_POLL_S)
    finally:
        if created:
            os.unlink(trigger)


def _command(path: str, command: str, deadline: float) -> tuple[int, str]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(max(0.1, deadline - time.monotonic()))
        conn.connect(path)
        conn.sendall(b"1\0jcmd\0" + command.encode() + b"\0\0\0")
        chunks, size = [], 0
        while size < _MAX_REPLY_BYTES and (chunk := conn.recv(1 << 16)):
            chunks.append(chunk)
            size += len(chunk)
    status, _, output = b"".join(chunks).partition(b"\n")
    try:
        return int(status), output.decode(errors="replace")
    except ValueError as exc:
        raise AttachError(f"{command}: malformed reply {status[:40]!r}") from exc


def main(argv: list[str]) -> int:
    pid, nspid, start_time, timeout_s, *commands = argv
    try:
        replies = _run(int(pid), int(nspid), int(start_time), commands, float(timeout_s))
    except (AttachError, OSError) as exc:  # gone, refused, timed out: one line for the log
        print(exc, file=sys.stderr)
        return 1
    json.dump(replies, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
