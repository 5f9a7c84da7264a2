"""Peak resident memory of an `imet` command run in a fresh process (used by the benchmarks).

ru_maxrss of a child counts the memory its parent had when it forked, so the child reports its own
high-water mark (VmHWM, reset by exec) as it exits.
"""

from __future__ import annotations

import subprocess
import sys

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


def peak_rss_mib(*imet_args: str) -> float:
    """Run `imet ARGS...` in a new process; its peak resident set size in MiB."""
    out = subprocess.run([sys.executable, "-c", WRAPPER, *imet_args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"imet {' '.join(imet_args)} failed:\n{out.stderr}")
    return int(out.stderr.rsplit("PEAK_RSS_KIB", 1)[1].split()[0]) / 1024
