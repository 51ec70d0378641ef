"""Machine facts for a benchmark report (CPU, memory, versions, git state, load average) and the
server's peak-RSS polling (RssMonitor, from /proc)."""

from __future__ import annotations

import os
import platform
import subprocess
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine_info() -> dict[str, Any]:
    cpu_model, flags = "unknown", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu_model == "unknown":
                cpu_model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    mem_total_kib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total_kib = int(line.split()[1])
    except OSError:
        pass
    versions = {}
    for dist in ("torch", "transformers", "httpx", "matplotlib", "vlmserve"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "src"], capture_output=True, text=True
        ).stdout.rstrip()
        git = rev + (" (src/ modified)" if dirty else "")
        src_changes = dirty.splitlines()
    except (OSError, subprocess.CalledProcessError):
        git, src_changes = None, []
    return {
        "cpu_model": cpu_model,
        "cpu_flags_of_note": [f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma"))],
        "logical_cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "mem_total_gib": round(mem_total_kib / 2**20, 1) if mem_total_kib else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
        "git": git,
        "src_uncommitted": src_changes,
    }


class RssMonitor(threading.Thread):
    """Polls the RSS of a process and its descendants; keeps the overall and the current-phase peak."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(name="rss-monitor", daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_kib = 0
        self.phase_peak_kib = 0
        self.main_hwm_kib = 0
        self._stop = threading.Event()

    @staticmethod
    def _status(pid: int) -> dict[str, int]:
        out = {}
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
        except (OSError, ValueError):
            pass
        return out

    def _tree(self) -> list[int]:
        pids, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            try:
                for task in Path(f"/proc/{pid}/task").iterdir():
                    todo.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                pass
        return pids

    def sample(self) -> None:
        total = 0
        for pid in self._tree():
            status = self._status(pid)
            total += status.get("VmRSS", 0)
            if pid == self.pid:
                self.main_hwm_kib = max(self.main_hwm_kib, status.get("VmHWM", 0))
        self.peak_kib = max(self.peak_kib, total)
        self.phase_peak_kib = max(self.phase_peak_kib, total)

    def new_phase(self) -> None:
        self.phase_peak_kib = 0
        self.sample()

    def run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
