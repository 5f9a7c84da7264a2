"""`imet fit ARGS...` killed by SIGKILL after the checkpoint of epoch K of training phase P (0: the first run of
the training loop; attn_rnn and mldecoder's second is the head itself after its csra start) was written, at one
of these points (tests/test_checkpoint.py resumes it):

- `P:K`: in the middle of the next epoch (the second optimiser step after that write);
- `P:K:row`: after the next epoch's metrics row was written, before its checkpoint is saved;
- `P:K:half`: while the next epoch's metrics row is written (the file ends with half of it).

    python tests/fit_killed.py P:K[:row|:half] imet-fit-arguments...
"""

import os
import signal
import sys

import torch

from imet import checkpoint
from imet.cli import cli

where = sys.argv[1].split(":")
kill_after, point = (int(where[0]), int(where[1])), (where[2:] or ["step"])[0]
seen = {"at": (0, 0), "steps": 0}
save, step, write = checkpoint.Checkpoint.save, torch.optim.Adam.step, checkpoint.MetricsLog.write


def kill():
    os.kill(os.getpid(), signal.SIGKILL)


def saving(self, phase, state):
    if point == "row" and seen["at"] >= kill_after:
        kill()
    save(self, phase, state)
    seen["at"] = (phase, state["epochs_done"])


def stepping(self, *args, **kwargs):
    if point == "step" and seen["at"] >= kill_after:
        seen["steps"] += 1
        if seen["steps"] == 2:
            kill()
    return step(self, *args, **kwargs)


def writing(self, row):
    size = self.path.stat().st_size if self.path.exists() else 0
    write(self, row)
    if point == "half" and seen["at"] >= kill_after:
        os.truncate(self.path, size + (self.path.stat().st_size - size) // 2)
        kill()


checkpoint.Checkpoint.save, torch.optim.Adam.step, checkpoint.MetricsLog.write = saving, stepping, writing
cli(["fit", *sys.argv[2:]])
