"""`imet fit ARGS...` killed by SIGKILL in the middle of epoch K+1 of training phase P (0: the first run of the
training loop; attn_rnn and mldecoder's second is the head itself after its csra start), after that epoch K's
checkpoint was written: the second optimiser step after that write kills the process (tests/test_checkpoint.py
resumes it).

    python tests/fit_killed.py P:K imet-fit-arguments...
"""

import os
import signal
import sys

import torch

from imet import checkpoint
from imet.cli import cli

kill_after, seen = tuple(int(x) for x in sys.argv[1].split(":")), {"at": (0, 0), "steps": 0}
save, step = checkpoint.Checkpoint.save, torch.optim.Adam.step


def saving(self, phase, state):
    save(self, phase, state)
    seen["at"] = (phase, state["epochs_done"])


def stepping(self, *args, **kwargs):
    if seen["at"] >= kill_after:
        seen["steps"] += 1
        if seen["steps"] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return step(self, *args, **kwargs)


checkpoint.Checkpoint.save, torch.optim.Adam.step = saving, stepping
cli(["fit", *sys.argv[2:]])
