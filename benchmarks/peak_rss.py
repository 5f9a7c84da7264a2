"""Wall time and peak resident memory of an `imet` command run in a fresh process (used by the benchmarks).

ru_maxrss of a child counts the memory its parent had when it forked, so the child reports its own
high-water mark (VmHWM, reset by exec) as it exits.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass

WRAPPER = """
import atexit, sys
def report():
    with open("/proc/self/status") as f:
        peak = next(line for line in f if line.startswith("VmHWM:")).split()[1]
    sys.stderr.write(f"\\nPEAK_RSS_KIB {peak}\\n")
atexit.register(report)
sys.argv = ["imet", *sys.argv[1:]]
from imet.cli import main
main()
"""


@dataclass
class Run:
    seconds: float
    peak_mib: float | None  # None when the process was killed before it could report
    returncode: int  # -9 when it ran past the timeout
    output: str  # stdout + stderr


def run_imet(*imet_args: str, timeout: float | None = None, env: dict | None = None) -> Run:
    """Run `imet ARGS...` in a new process; its wall time, peak RSS and output (killed after `timeout` s)."""
    t0 = time.monotonic()
    try:
        out = subprocess.run([sys.executable, "-c", WRAPPER, *imet_args], capture_output=True, text=True,
                             timeout=timeout, env=env)
        rc, text = out.returncode, out.stdout + out.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = -9, (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    seconds = time.monotonic() - t0
    peak = int(text.rsplit("PEAK_RSS_KIB", 1)[1].split()[0]) / 1024 if "PEAK_RSS_KIB" in text else None
    return Run(seconds, peak, rc, text.rsplit("PEAK_RSS_KIB", 1)[0])


def peak_rss_mib(*imet_args: str) -> float:
    """Run `imet ARGS...` in a new process; its peak resident set size in MiB."""
    run = run_imet(*imet_args)
    if run.returncode != 0:
        raise RuntimeError(f"imet {' '.join(imet_args)} failed:\n{run.output}")
    return run.peak_mib
