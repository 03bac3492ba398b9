r"""Job attribution: which job a process belongs to, by configurable, ordered resolvers.

A resolver reads one fact of a process: an environment variable (/proc/PID/environ), its
command line (/proc/PID/cmdline), its cgroup path (/proc/PID/cgroup) or its pod's Kubernetes
labels. The first resolver that names a job wins. Resolvers come from a TOML file
(`--job-config`), then from flags in command-line order; with neither, DEFAULT_RESOLVERS.

    [[resolver]]
    env = ["FLEETPROF_JOB", "SPARK_APPLICATION_ID"]   # the first one set

    [[resolver]]
    cmdline = 'CoarseGrainedExecutorBackend .*--app-id (\S+)'   # group 1, or the match

    [[resolver]]
    cgroup = '/job_(\d+)(?:/|$)'
    template = 'slurm-{1}'        # optional: str.format of the match ({0}) and groups

    [[resolver]]
    k8s_label = ["spark-app-selector", "job-name"]    # the first label the pod has
"""

from __future__ import annotations

import re
import tomllib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fleetprof.node_agent.symbolize.process import read_proc

if TYPE_CHECKING:
    from fleetprof.node_agent.kubernetes import ContainerInfo

# How far up its ancestry a process's job is looked for.
MAX_ANCESTORS = 16
# A job name is a column value in every row: an absurd environment variable must not bloat them.
MAX_JOB_LENGTH = 256

DEFAULT_RESOLVERS: tuple[dict[str, Any], ...] = (
    {"env": ["FLEETPROF_JOB", "SPARK_APPLICATION_ID"]},
    # Spark executors on YARN and standalone clusters get their application id as an argument.
    {"cmdline": r"CoarseGrainedExecutorBackend .*--app-id[= ](\S+)"},
    {"k8s_label": ["spark-app-selector", "job-name"]},
    # Slurm's cgroup plugins (v1 and v2) put every task of job N under .../job_N/.
    {"cgroup": r"/job_(\d+)(?:/|$)", "template": "slurm-{1}"},
)


class PodLookup(Protocol):
    """What the Kubernetes resolver needs (KubernetesMetadata provides it)."""

    def lookup(self, pid: int) -> ContainerInfo | None: ...

    def settled(self, pid: int) -> bool: ...


class Resolver(ABC):
    @abstractmethod
    def resolve(self, pid: int) -> str | None:
        """The job of pid, or None; never raises for a vanished or unreadable process."""

    def settled(self, pid: int) -> bool:
        """Whether a None from resolve(pid) is final for this process image.

        Environment, command line and cgroup are fixed at exec; pod metadata may still arrive.
        """
        return True


def _read(path: str) -> bytes | None:
    try:
        return read_proc(path)
    except OSError:  # gone, a kernel thread, or not ours to read (another user's environ)
        return None


def _parent(pid: int) -> int | None:
    """pid's parent process, from /proc/PID/stat; None if pid is gone."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    # After "(comm)", which may itself hold ") ": state, then ppid.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[1]) if len(fields) > 1 else None


def _job(value: str) -> str | None:
    return value[:MAX_JOB_LENGTH] or None


class EnvResolver(Resolver):
    """The first of `names` set (non-empty) in the process's initial environment."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        # Looked for as "\0NAME=" in "\0" + environ: found by bytes.find, not by a loop
        # over every variable (an environment holds dozens).
        self._entries = tuple(b"\0" + name.encode() + b"=" for name in self.names)

    def resolve(self, pid: int) -> str | None:
        environ = _read(f"/proc/{pid}/environ")
        if not environ:
            return None
        environ = b"\0" + environ
        for entry in self._entries:
            at = environ.rfind(entry)  # of a name defined twice, the last definition
            if at < 0:
                continue
            start = at + len(entry)
            end = environ.find(b"\0", start)
            value = environ[start : end if end >= 0 else len(environ)]
            if value:
                return _job(value.decode(errors="replace"))
        return None


class RegexResolver(Resolver):
    """A regex searched in a text of the process. The job is group 1 (the whole match if the
    regex has no group), or `template` formatted with the groups: "slurm-{1}", "{name}"."""

    def __init__(self, pattern: str, template: str | None = None) -> None:
        self.pattern = re.compile(pattern)
        self.template = template
        if template is not None:
            # A bad group reference fails now, not on the first matching process.
            template.format(
                *[""] * (self.pattern.groups + 1), **dict.fromkeys(self.pattern.groupindex, "")
            )

    def match(self, texts: Iterable[str]) -> str | None:
        for text in texts:
            m = self.pattern.search(text)
            if m:
                if self.template is not None:
                    groups = [m.group(0), *m.groups("")]
                    return _job(self.template.format(*groups, **m.groupdict("")))
                return _job((m.group(1) or "") if self.pattern.groups else m.group(0))
        return None


class CmdlineResolver(RegexResolver):
    """Searches the command line, arguments joined by spaces."""

    def resolve(self, pid: int) -> str | None:
        cmdline = _read(f"/proc/{pid}/cmdline")
        if not cmdline:
            return None
        return self.match([cmdline.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")])


class CgroupResolver(RegexResolver):
    """Searches the process's cgroup paths, one per hierarchy (cgroup v1 has several)."""

    def resolve(self, pid: int) -> str | None:
        cgroups = _read(f"/proc/{pid}/cgroup")
        if not cgroups:
            return None
        lines = cgroups.decode(errors="replace").splitlines()
        return self.match(line.split(":", 2)[-1] for line in lines)


class KubernetesLabelResolver(Resolver):
    """The value of the first of `labels` that the process's pod carries."""

    def __init__(self, labels: Sequence[str], pods: PodLookup) -> None:
        self.labels = tuple(labels)
        self.pods = pods

    def resolve(self, pid: int) -> str | None:
        info = self.pods.lookup(pid)
        if info is None:
            return None
        for label in self.labels:
            if info.labels.get(label):
                return _job(info.labels[label])
        return None

    def settled(self, pid: int) -> bool:
        return self.pods.settled(pid)


def _names(value: Any, key: str) -> list[str]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(n and isinstance(n, str) for n in names):
        raise ValueError(f"{key} takes a name or a non-empty list of names, not {value!r}")
    return names


_KINDS = ("env", "cmdline", "cgroup", "k8s_label")


def build_resolver(spec: Mapping[str, Any], pods: PodLookup) -> Resolver:
    """One resolver from its spec: exactly one of env, cmdline, cgroup or k8s_label, and an
    optional template for cmdline and cgroup."""
    kinds = [kind for kind in _KINDS if kind in spec]
    kind = kinds[0] if len(kinds) == 1 else None
    extra = spec.keys() - {kind, "template" if kind in ("cmdline", "cgroup") else kind}
    if kind is None or extra:
        raise ValueError(
            "a job resolver has one of env, cmdline, cgroup or k8s_label (and a template for "
            f"cmdline and cgroup); got {dict(spec)!r}"
        )
    value = spec[kind]
    if kind == "env":
        return EnvResolver(_names(value, kind))
    if kind == "k8s_label":
        return KubernetesLabelResolver(_names(value, kind), pods)
    template = spec.get("template")
    if not isinstance(value, str) or not isinstance(template, str | None):
        raise ValueError(f"{kind} takes a regular expression and template a string")
    try:
        return (CmdlineResolver if kind == "cmdline" else CgroupResolver)(value, template)
    except (re.error, IndexError, KeyError, ValueError) as e:
        raise ValueError(f"bad {kind} resolver {value!r} (template {template!r}): {e}") from None


def load_config(path: str | Path) -> list[dict[str, Any]]:
    """The resolver specs of a TOML job config file (its `[[resolver]]` tables)."""
    try:
        with open(path, "rb") as f:
            config = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"cannot read job config {path}: {e}") from None
    specs = config.get("resolver", [])
    if set(config) - {"resolver"} or not all(isinstance(spec, dict) for spec in specs):
        raise ValueError(f"{path}: a job config holds only [[resolver]] tables")
    return specs


class JobResolver:
    """Resolves pids to jobs with ordered resolvers, cached per pid.

    A process none of whose own facts names a job has its parent's: the workers a job's
    process forks, the shells and tools it runs. Only a job named by the process itself
    (its environment, say) overrides the parent's.

    Resolve a process while it lives (/proc is all there is to read): at its first sample.
    Its job stays cached after it exits, for the drain that follows; call forget(pid) then
    (its pid may be reused), and at its next exec (environment and command line change).
    """

    def __init__(self, resolvers: Sequence[Resolver]) -> None:
        self.resolvers = tuple(resolvers)
        self._jobs: dict[int, str | None] = {}

    @classmethod
    def from_config(cls, specs: Iterable[Mapping[str, Any]], pods: PodLookup) -> JobResolver:
        specs = list(specs)
        return cls([build_resolver(spec, pods) for spec in specs or DEFAULT_RESOLVERS])

    def resolve(
        self, pid: int, ancestors: int = MAX_ANCESTORS, parent: int | None = None
    ) -> str | None:
        """pid's job; `parent`, pid's parent if known, spares reading it."""
        if pid in self._jobs:
            return self._jobs[pid]
        settled = True
        for resolver in self.resolvers:
            job = resolver.resolve(pid)
            if job is not None:
                self._jobs[pid] = job
                return job
            settled = settled and resolver.settled(pid)
        if not ancestors:
            parent = None
        elif parent is None:
            parent = _parent(pid)
        # pid 1 (init) and 2 (kthreadd) lead no job: not worth their /proc reads.
        job = self.resolve(parent, ancestors - 1) if parent is not None and parent > 2 else None
        if job is not None or settled:
            self._jobs[pid] = job
        return job

    def forget(self, pid: int) -> None:
        self._jobs.pop(pid, None)

    def pids(self) -> set[int]:
        return set(self._jobs)

    def __len__(self) -> int:
        """Processes whose job is cached."""
        return len(self._jobs)
