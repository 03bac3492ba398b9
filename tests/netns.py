"""Separate network hosts on one machine: network namespaces, each joined to the root
namespace by a veth pair on its own /30 of a private /24 picked per test run."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tests.conftest import require


@dataclass(frozen=True)
class Host:
    namespace: str
    # The veth end in the root namespace ("the switch port": down cuts the host off).
    link: str
    # The root namespace's address on that link, and the host's own.
    gateway: str
    address: str

    def command(self, *argv: str) -> list[str]:
        """argv run inside this host's network namespace. Not `ip netns exec`: it mounts a
        sysfs of the namespace's own, without the tracefs BCC reads tracepoint formats from."""
        return ["nsenter", f"--net=/run/netns/{self.namespace}", *argv]


def _ip(*argv: str) -> None:
    result = subprocess.run(["ip", *argv], capture_output=True, text=True)
    require(result.returncode == 0, f"ip {' '.join(argv)}: {result.stderr.strip()}")


@contextmanager
def network_hosts(count: int) -> Iterator[list[Host]]:
    """`count` hosts (at most 63); removed on exit, however the test ended. Each routes
    everything through its gateway, so it reaches every address of the root namespace."""
    require(shutil.which("ip") is not None, "iproute2 is not installed")
    require(shutil.which("nsenter") is not None, "nsenter (util-linux) is not installed")
    tag = os.getpid() % 10_000
    subnet = f"10.213.{os.getpid() % 200 + 20}"
    hosts = [
        Host(f"fp{tag}n{i}", f"fp{tag}h{i}", f"{subnet}.{4 * i + 1}", f"{subnet}.{4 * i + 2}")
        for i in range(count)
    ]
    try:
        for i, host in enumerate(hosts):
            _remove(host)  # left over by a run of the same pid that was killed
            peer = f"fp{tag}p{i}"
            _ip("netns", "add", host.namespace)
            _ip("link", "add", host.link, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", host.namespace)
            _ip("addr", "add", f"{host.gateway}/30", "dev", host.link)
            _ip("link", "set", host.link, "up")
            inside = ("-n", host.namespace)
            _ip(*inside, "addr", "add", f"{host.address}/30", "dev", peer)
            _ip(*inside, "link", "set", peer, "up")
            _ip(*inside, "link", "set", "lo", "up")
            _ip(*inside, "route", "add", "default", "via", host.gateway)
        yield hosts
    finally:
        for host in hosts:
            _remove(host)


def _remove(host: Host) -> None:
    # Deleting one end of a veth pair deletes both.
    subprocess.run(["ip", "link", "del", host.link], capture_output=True)
    subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)
