"""Off-CPU time above a minimum duration, with the stacks at switch-out (offcpu.bpf.c;
switches.py runs it).

Needs the sched_exit_tp raw tracepoint (Linux 6.16+).
"""

from __future__ import annotations

# sample_key_t.detail's top byte of offcpu weight (offcpu.bpf.c DETAIL_OFFCPU).
DETAIL_OFFCPU = 3
