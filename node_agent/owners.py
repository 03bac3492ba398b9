"""Who a process belongs to: its job (the configured resolvers) and its Kubernetes pod.

Asked lazily, for processes samples hit (at their first sample, while /proc/PID is there
to answer) and those an on-demand session considers; answers are cached per pid by the
resolvers and dropped with `forget` after the process's last drain or at its exec.
"""

from __future__ import annotations

from typing import NamedTuple

from fleetprof.node_agent.jobs import JobResolver
from fleetprof.node_agent.kubernetes import KubernetesMetadata


class Owner(NamedTuple):
    job: str | None = None
    namespace: str | None = None
    pod: str | None = None
    container: str | None = None


class ProcessOwners:
    def __init__(self, jobs: JobResolver, pods: KubernetesMetadata) -> None:
        self.jobs = jobs
        self.pods = pods

    def owner(self, pid: int, ppid: int | None = None) -> Owner:
        """pid's owner; `ppid`, its parent if known, spares reading it."""
        pod = self.pods.lookup(pid)
        return Owner(
            self.jobs.resolve(pid, parent=ppid),
            pod.namespace if pod else None,
            pod.pod if pod else None,
            pod.container if pod else None,
        )

    def job(self, pid: int) -> str | None:
        """pid's job alone (what a session's filter needs)."""
        return self.jobs.resolve(pid)

    def forget(self, pid: int) -> None:
        self.jobs.forget(pid)
        self.pods.forget(pid)

    def pids(self) -> set[int]:
        """The processes whose answers are cached (their ancestors' too)."""
        return self.jobs.pids() | self.pods.pids()

    def close(self) -> None:
        self.pods.stop()
