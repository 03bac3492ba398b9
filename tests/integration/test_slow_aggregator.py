"""A slow aggregator (a throttled link in front of a real one): the agent's memory stays
bounded, what it cannot deliver waits in the on-disk spool, and all of it arrives, in order
and once, when the link recovers."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

from fleetprof import workloads
from tests.conftest import free_port, require_ebpf
from tests.integration.test_faults import agent_process, start_aggregator, stored_weight
from tests.throttle import ThrottledProxy

SLOW_S = 40
# Far below what a busy CPU sampled at 499 Hz produces in a 1 s interval (a few kB): a batch
# cannot get through before the agent's 10 s ack timeout.
SLOW_BYTES_PER_S = 200
# The agent holds at most one batch in flight; the rest is on disk, not in memory.
RSS_GROWTH_LIMIT_KB = 48 * 1024


def rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])


def settled_rss_kb(pid: int, timeout_s: float = 30) -> int:
    """pid's RSS once start-up is over: unchanged within 2 MB over a second (its first
    processes' symbol and unwind tables take seconds to load on a cold, busy machine)."""
    deadline = time.monotonic() + timeout_s
    rss = rss_kb(pid)
    while time.monotonic() < deadline:
        time.sleep(1)
        rss, last = rss_kb(pid), rss
        if abs(rss - last) < 2 * 1024:
            break
    return rss


def test_slow_aggregator_keeps_agent_memory_bounded_and_loses_nothing(
    tmp_path: Path, native_binary: Path
) -> None:
    require_ebpf()
    db, port, spool = tmp_path / "profiles.duckdb", free_port(), tmp_path / "spool"
    aggregator = start_aggregator(db, port)
    # Samples every interval, however quiet the machine is otherwise (idle is not sampled).
    workload = workloads.start_native(native_binary, seconds=300)
    try:
        with ThrottledProxy(("127.0.0.1", port)) as link:
            agent = agent_process(
                link.address, spool, "--interval", "1", "--frequency", "499", "--spool-max-mb", "64"
            )
            log: list[str] = []
            reader = threading.Thread(target=lambda: log.extend(agent.stderr), daemon=True)
            reader.start()
            time.sleep(3)  # past start-up: a few batches delivered at full speed
            baseline = settled_rss_kb(agent.pid)

            link.bytes_per_s = SLOW_BYTES_PER_S
            peak, most_spooled = baseline, 0
            slow_until = time.monotonic() + SLOW_S
            while time.monotonic() < slow_until:
                peak = max(peak, rss_kb(agent.pid))
                most_spooled = max(most_spooled, len(list(spool.glob("*.batch"))))
                time.sleep(0.5)

            link.bytes_per_s = None
            recovered_by = time.monotonic() + 90
            while list(spool.glob("*.batch")) and time.monotonic() < recovered_by:
                time.sleep(0.5)
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(timeout=60) == 0
            reader.join(timeout=10)
    finally:
        workload.kill()
    aggregator.send_signal(signal.SIGTERM)
    aggregator.wait(timeout=30)

    print(
        f"agent RSS {baseline // 1024} MB after start-up, peak {peak // 1024} MB while slow; "
        f"at most {most_spooled} batches spooled"
    )
    assert most_spooled >= 3, "the slow link should have pushed batches to the spool"
    assert peak - baseline < RSS_GROWTH_LIMIT_KB
    final = next(line for line in log if "agent stopped" in line)
    drained = int(final.split("agent stopped: ")[1].split()[0])
    assert "0 left in the spool" in final
    assert not any("dropped" in line and "spool" in line for line in log)
    assert stored_weight(db) == drained
