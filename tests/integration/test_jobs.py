"""Job resolvers on real processes: environment, command line, and cgroups the test creates."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from fleetprof.commands.options import add_job_arguments, job_specs
from fleetprof.node_agent.jobs import JobResolver, load_config
from fleetprof.node_agent.kubernetes import KubernetesMetadata

if TYPE_CHECKING:  # imported by pytest as the plugin below
    from tests.cgroups import ScratchCgroups

pytest_plugins = ["tests.cgroups"]

NO_CLUSTER = KubernetesMetadata("node", None)
SPARK_EXECUTOR = (
    "org.apache.spark.executor.CoarseGrainedExecutorBackend",
    "--driver-url", "spark://CoarseGrainedScheduler@10.0.3.7:40127",
    "--executor-id", "3",
    "--hostname", "10.0.3.12",
    "--cores", "4",
    "--app-id", "app-20240611093512-0042",
    "--resourceProfileId", "0",
)  # fmt: skip


def sleeper(*args: str) -> list[str]:
    """A process whose command line ends with args (Python passes them on to sys.argv)."""
    return [sys.executable, "-c", "import time; time.sleep(60)", *args]


def env(**variables: str) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], **variables}


def resolver(*specs: dict[str, object]) -> JobResolver:
    return JobResolver.from_config(specs, NO_CLUSTER)


def test_environment_variables_in_order(cgroups: ScratchCgroups) -> None:
    jobs = resolver({"env": ["FLEETPROF_JOB", "SPARK_APPLICATION_ID"]})
    etl = cgroups.spawn(env=env(FLEETPROF_JOB="etl-nightly"))
    spark = cgroups.spawn(env=env(SPARK_APPLICATION_ID="spark-1c9e"))
    both = cgroups.spawn(env=env(SPARK_APPLICATION_ID="spark-1c9e", FLEETPROF_JOB="etl-7"))
    empty = cgroups.spawn(env=env(FLEETPROF_JOB="", SPARK_APPLICATION_ID="spark-2"))
    # A name that only ends like a wanted one is another variable.
    other = cgroups.spawn(env=env(MY_FLEETPROF_JOB="no", JOB="no"))
    assert jobs.resolve(etl) == "etl-nightly"
    assert jobs.resolve(spark) == "spark-1c9e"
    assert jobs.resolve(both) == "etl-7"
    assert jobs.resolve(empty) == "spark-2"
    assert jobs.resolve(other) is None
    assert jobs.resolve(2) is None  # kthreadd: a kernel thread has no environment


def test_spark_executor_command_line(cgroups: ScratchCgroups) -> None:
    jobs = JobResolver.from_config([], NO_CLUSTER)  # the defaults
    executor = cgroups.spawn(sleeper(*SPARK_EXECUTOR))
    # --app-id elsewhere is not a Spark executor's.
    other = cgroups.spawn(sleeper("--app-id", "org.example.Viewer"))
    assert jobs.resolve(executor) == "app-20240611093512-0042"
    assert jobs.resolve(other) is None
    custom = resolver({"cmdline": r"--executor-id (?P<id>\d+)", "template": "exec-{id}"})
    assert custom.resolve(executor) == "exec-3"
    assert custom.resolve(other) is None


def test_cgroups(cgroups: ScratchCgroups) -> None:
    jobs = JobResolver.from_config([], NO_CLUSTER)
    # Slurm's cgroup v2 layout (v1 is /slurm/uid_N/job_N/step_N/task_N in each hierarchy).
    task = cgroups.spawn(cgroup="system.slice/slurmstepd.scope/job_4242/step_0/user/task_0")
    batch = cgroups.spawn(cgroup="system.slice/slurmstepd.scope/job_77/step_batch/user/task_0")
    # Not a job: the number must be a whole path component.
    near = cgroups.spawn(cgroup="system.slice/job_12x.service")
    assert jobs.resolve(task) == "slurm-4242"
    assert jobs.resolve(batch) == "slurm-77"
    assert jobs.resolve(near) is None
    units = resolver({"cgroup": r"/([\w.-]+)\.service$"})
    unit = cgroups.spawn(cgroup="system.slice/nightly-etl.service")
    assert units.resolve(unit) == "nightly-etl"
    assert units.resolve(task) is None


def test_first_resolver_that_names_a_job_wins(cgroups: ScratchCgroups) -> None:
    jobs = resolver({"cgroup": r"/job_(\d+)/"}, {"env": ["FLEETPROF_JOB"]})
    both = cgroups.spawn(env=env(FLEETPROF_JOB="by-env"), cgroup="slurm/job_9/step_0")
    env_only = cgroups.spawn(env=env(FLEETPROF_JOB="by-env"))
    assert jobs.resolve(both) == "9"
    assert jobs.resolve(env_only) == "by-env"


def test_cached_until_forgotten_on_exec(cgroups: ScratchCgroups) -> None:
    jobs = resolver({"env": ["FLEETPROF_JOB"]})
    # The shell execs a program with another environment after a moment.
    script = "read line; exec env FLEETPROF_JOB=second sleep 60"
    process = subprocess.Popen(
        ["sh", "-c", script], env=env(FLEETPROF_JOB="first"), stdin=subprocess.PIPE
    )
    cgroups.processes.append(process)
    cgroups.wait_exec_done(process.pid)
    assert jobs.resolve(process.pid) == "first"
    assert process.stdin is not None
    process.stdin.close()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{process.pid}/comm").read_text() != "sleep\n":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert jobs.resolve(process.pid) == "first"  # cached
    jobs.forget(process.pid)  # as the agent does on the exec event
    assert jobs.resolve(process.pid) == "second"
    # After exit the cached job remains (the agent drains the exited process's samples later).
    process.kill()
    process.wait()
    assert jobs.resolve(process.pid) == "second"
    jobs.forget(process.pid)
    assert jobs.resolve(process.pid) is None


def test_a_child_has_its_parents_job_unless_it_names_its_own(cgroups: ScratchCgroups) -> None:
    jobs = JobResolver.from_config([], NO_CLUSTER)  # the defaults
    # A Spark executor (its job on its command line) runs two workers: one names no job of
    # its own, the other has FLEETPROF_JOB in its environment.
    starter = (
        "import os, subprocess, time\n"
        "plain = subprocess.Popen(['sleep', '30'])\n"
        "own = subprocess.Popen(['sleep', '30'], env={**os.environ, 'FLEETPROF_JOB': 'own'})\n"
        "print(plain.pid, own.pid, flush=True)\n"
        "time.sleep(30)\n"
    )
    executor = subprocess.Popen(
        [sys.executable, "-c", starter, *SPARK_EXECUTOR], stdout=subprocess.PIPE, text=True
    )
    cgroups.processes.append(executor)
    assert executor.stdout is not None
    plain, own = (int(pid) for pid in executor.stdout.readline().split())
    try:
        cgroups.wait_exec_done(plain)
        cgroups.wait_exec_done(own)
        assert jobs.resolve(plain) == "app-20240611093512-0042"
        assert jobs.resolve(own) == "own"
    finally:
        for pid in (plain, own):
            os.kill(pid, 9)


def test_unreadable_processes_have_no_job(cgroups: ScratchCgroups) -> None:
    pid = cgroups.spawn(env=env(FLEETPROF_JOB="secret"))
    jobs = resolver({"env": ["FLEETPROF_JOB"]})
    # As nobody, another user's environ is not readable (EACCES): no job, no error.
    child = os.fork()
    if child == 0:
        os.setresuid(65534, 65534, 65534)
        try:
            unreadable = not os.access(f"/proc/{pid}/environ", os.R_OK)
            os._exit(0 if unreadable and jobs.resolve(pid) is None else 1)
        finally:
            os._exit(2)
    assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0
    assert jobs.resolve(pid) == "secret"


def test_config_file_then_flags_in_order(tmp_path: Path, cgroups: ScratchCgroups) -> None:
    config = tmp_path / "jobs.toml"
    config.write_text(
        "[[resolver]]\n"
        "env = 'TEAM_JOB'\n"
        "\n"
        "[[resolver]]\n"
        "cgroup = '/job_(\\d+)/'\n"
        "template = 'hpc-{1}'\n"
    )
    parser = argparse.ArgumentParser()
    add_job_arguments(parser)
    args = parser.parse_args(
        ["--job-cmdline", r"--app-id (\S+)", "--job-config", str(config), "--job-env", "A,B"]
    )
    assert args.job_resolvers == [{"cmdline": r"--app-id (\S+)"}, {"env": ["A", "B"]}]
    jobs = JobResolver.from_config(job_specs(args), NO_CLUSTER)
    kinds = [type(r).__name__ for r in jobs.resolvers]
    assert kinds == ["EnvResolver", "CgroupResolver", "CmdlineResolver", "EnvResolver"]
    pid = cgroups.spawn(sleeper(*SPARK_EXECUTOR), env=env(B="b"), cgroup="slurm/job_5/step_0")
    assert jobs.resolve(pid) == "hpc-5"
    defaults = JobResolver.from_config(job_specs(parser.parse_args([])), NO_CLUSTER)
    kinds = [type(r).__name__ for r in defaults.resolvers]
    assert kinds == ["EnvResolver", "CmdlineResolver", "KubernetesLabelResolver", "CgroupResolver"]


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ({"cmdline": "(unclosed"}, "bad cmdline resolver"),
        ({"cgroup": r"/job_(\d+)", "template": "slurm-{2}"}, "bad cgroup resolver"),
        ({"cgroup": r"/job_(\d+)", "template": "{name}"}, "bad cgroup resolver"),
        ({"env": []}, "non-empty list"),
        ({"env": ["A", ""]}, "non-empty list"),
        ({"env": "A", "template": "x"}, "has one of"),
        ({"env": "A", "cgroup": "x"}, "has one of"),
        ({"pid": 1}, "has one of"),
        ({"cgroup": ["x"]}, "regular expression"),
    ],
)
def test_bad_resolvers(spec: dict[str, object], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        resolver(spec)


def test_bad_config_files(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text("[[resolver]\nenv = 'A'\n")
    with pytest.raises(ValueError, match="cannot read job config"):
        load_config(path)
    path.write_text("[jobs]\nenv = 'A'\n")
    with pytest.raises(ValueError, match=r"only \[\[resolver\]\] tables"):
        load_config(path)
    path.write_text("resolver = ['A']\n")
    with pytest.raises(ValueError, match=r"only \[\[resolver\]\] tables"):
        load_config(path)
    with pytest.raises(ValueError, match="cannot read job config"):
        load_config(tmp_path / "missing.toml")
