"""Running one benchmark contender under a real memory cap: a cgroup v1 memory group of its own.

A child group of /sys/fs/cgroup/memory gets `memory.limit_in_bytes` (and `memory.memsw.limit_in_bytes` where
present, so swap cannot stand in); the child process joins it before exec. cgroup v1 charges a page-cache page to
the group of the process that first brings it into memory, so the checkpoint's pages are dropped from the page
cache before each contender (`drop_page_cache`: fsync, then `posix_fadvise(DONTNEED)`): every byte a contender
reads from the checkpoint is then read from the disk and charged to its own group. What comes back: the exit code,
the group's peak (`memory.max_usage_in_bytes`: anonymous memory and page cache together), how often the limit was
reached (`memory.failcnt`), whether the OOM killer ran, and the major page faults the group took.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup/memory")


def drop_page_cache(files: list[Path]) -> None:
    """Each file's pages out of the page cache (dirty pages written first: DONTNEED skips dirty pages)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cgroup_available() -> str | None:
    """None when a child memory group can be made here, else why not."""
    if not (CGROUP / "memory.limit_in_bytes").exists():
        return "no cgroup v1 memory controller at /sys/fs/cgroup/memory"
    if not os.access(CGROUP, os.W_OK):
        return "cgroup v1 memory controller not writable (not root)"
    return None


def _stat(group: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in (group / "memory.stat").read_text().splitlines())}


def run_capped(cmd: list[str], cap_mb: int | None, timeout: float) -> dict:
    """Run `cmd` in a fresh memory group of `cap_mb` MiB (None, or no controller: uncapped, and the record says
    why); its exit, the last JSON line it printed, and the group's peak memory, limit hits and OOM kills."""
    why = None if cap_mb else "no --cgroup-mb"
    why = why or cgroup_available()
    group = None if why else CGROUP / f"moekit-bench-{os.getpid()}-{time.monotonic_ns()}"
    if group is not None:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(cap_mb * 2**20))
        if (group / "memory.memsw.limit_in_bytes").exists():
            (group / "memory.memsw.limit_in_bytes").write_text(str(cap_mb * 2**20))

    def enter() -> None:
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    out = {"capped": group is not None, "cap_mb": cap_mb if group is not None else None, "cgroup_note": why}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, preexec_fn=enter, capture_output=True, text=True, timeout=timeout)  # noqa: PLW1509
        out.update(exit_code=proc.returncode, stderr_tail=proc.stderr[-400:])
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if lines:
            out.update(json.loads(lines[-1]))
    except subprocess.TimeoutExpired:
        out.update(exit_code=None, timed_out=True)
    out["wall_s"] = time.perf_counter() - t0
    if group is not None:
        out["peak_cgroup_bytes"] = int((group / "memory.max_usage_in_bytes").read_text())
        out["failcnt"] = int((group / "memory.failcnt").read_text())
        oom = dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines())
        out["oom_killed"] = int(oom.get("oom_kill", 0)) > 0 or out.get("exit_code") == -9
        out["cgroup_pgmajfault"] = _stat(group).get("total_pgmajfault")
        for _ in range(50):  # the child is gone; its page cache charges move to the parent group
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    return out


def process_io() -> dict[str, int]:
    """This process's bytes really read from storage (/proc/self/io read_bytes: page cache hits not counted) and
    its major page faults (/proc/self/stat field 12)."""
    out = {}
    try:
        io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        out["disk_read_bytes"] = int(io["read_bytes"])
        stat = Path("/proc/self/stat").read_text()
        out["major_faults"] = int(stat[stat.rindex(")") + 2:].split()[9])
    except (OSError, KeyError, ValueError):
        pass
    return out
