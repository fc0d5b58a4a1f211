"""How busy the machine was while a run timed its rows.

Interleaved timing rounds protect a ratio only when every row suffers alike from whatever else
runs, and PyTorch eager suffers far more than the runtimes (on the project's 2 cores, one other
process moved the ResNet-50 source row from p50 7.3 ms to 19.8 ms while OpenVINO's barely moved).
So every run records the load: the CPU time other processes took (the machine's busy time from
/proc/stat less this process's own, as a share of the cores), the hypervisor's steal time and the
load average, once in a quiet second before the timing rounds and over the rounds themselves.
Past the limits below the run says it timed under load, and the speedups over the source become
unreliable: the report marks them, and ``compare`` and ``tune`` read the mark.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

OTHERS_LIMIT = 0.10
"""share of the cores other processes may take before timing counts as under load"""
STEAL_LIMIT = 0.05
"""share of CPU time the hypervisor may steal before timing counts as under load"""
QUIET_PROBE_S = 1.0


@dataclass(frozen=True)
class CpuSample:
    wall: float
    busy: float  # seconds of CPU time, all processes (user, nice, system, irq, softirq)
    steal: float
    total: float
    own: float  # this process's CPU time (user + system, every thread)
    loadavg: float

    @classmethod
    def now(cls) -> CpuSample:
        busy = steal = total = 0.0
        try:
            with open("/proc/stat") as fh:
                fields = [float(v) for v in fh.readline().split()[1:]]
            hz = float(os.sysconf("SC_CLK_TCK"))
            user, nice, system, idle, iowait, irq, softirq, st = (fields + [0.0] * 8)[:8]
            busy, steal = (user + nice + system + irq + softirq) / hz, st / hz
            total = (user + nice + system + idle + iowait + irq + softirq + st) / hz
        except (OSError, ValueError):
            pass
        try:
            loadavg = os.getloadavg()[0]
        except OSError:
            loadavg = 0.0
        t = os.times()
        return cls(time.monotonic(), busy, steal, total, t.user + t.system, loadavg)


def between(a: CpuSample, b: CpuSample, cores: int) -> dict[str, Any]:
    """The load from sample ``a`` to ``b``: others' share of the cores, steal share, load average."""
    wall = max(b.wall - a.wall, 1e-9)
    total = b.total - a.total
    others = max(0.0, (b.busy - a.busy) - (b.own - a.own)) / (wall * max(cores, 1))
    return {"seconds": round(wall, 2), "others_cpu_share": round(min(others, 1.0), 4),
            "steal_share": round((b.steal - a.steal) / total, 4) if total > 0 else 0.0,
            "loadavg_1m": round(b.loadavg, 2), "measurable": a.total > 0}


class LoadMonitor:
    """``before()`` right before the timing rounds (a quiet probe: this process sleeps), ``during()``
    after them; :meth:`summary` is what the report keeps."""

    def __init__(self, cores: int | None = None, probe_s: float = QUIET_PROBE_S) -> None:
        from .environment import default_threads

        self.cores = cores or default_threads()
        self.probe_s = probe_s
        self._before: dict[str, Any] | None = None
        self._start: CpuSample | None = None
        self._during: dict[str, Any] | None = None

    def before(self) -> None:
        a = CpuSample.now()
        time.sleep(self.probe_s)
        self._start = CpuSample.now()
        self._before = between(a, self._start, self.cores)

    def during(self) -> None:
        assert self._start is not None, "before() first"
        self._during = between(self._start, CpuSample.now(), self.cores)

    def summary(self) -> dict[str, Any]:
        return judge(self._before, self._during, self.cores)


def judge(before: dict[str, Any] | None, during: dict[str, Any] | None, cores: int) -> dict[str, Any]:
    reasons = []
    for when, s in (("before", before), ("during", during)):
        if not s or not s.get("measurable", True):
            continue
        if s["others_cpu_share"] > OTHERS_LIMIT:
            reasons.append(f"other processes took {100 * s['others_cpu_share']:.0f}% of the {cores} cores {when} "
                           f"the timing rounds (limit {100 * OTHERS_LIMIT:.0f}%)")
        if s["steal_share"] > STEAL_LIMIT:
            reasons.append(f"the hypervisor stole {100 * s['steal_share']:.0f}% of CPU time {when} the timing "
                           f"rounds (limit {100 * STEAL_LIMIT:.0f}%)")
    return {"before": before, "during": during, "cores": cores, "under_load": bool(reasons), "reasons": reasons,
            "limits": {"others_cpu_share": OTHERS_LIMIT, "steal_share": STEAL_LIMIT}}
