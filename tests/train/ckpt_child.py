"""Test helper (run as a child process): save steps 1..N into ROOT; step N runs with the save hold.

Usage: python ckpt_child.py ROOT HOLD_FILE N. The test SIGKILLs this process while step N waits
inside `save` (data files written, manifest not yet), which is the crash a real job can suffer.
"""

import os
import sys

import torch

from pdt.train.checkpoint import CheckpointManager


def main() -> None:
    root, hold, last = sys.argv[1], sys.argv[2], int(sys.argv[3])
    manager = CheckpointManager(root)
    for step in range(1, last + 1):
        if step == last:
            os.environ["PDT_TEST_SAVE_HOLD"] = hold
        manager.save(
            step=step,
            tensors={"model": {"w": torch.full((64, 64), float(step))}},
            objects={"optimizer": {"step": torch.tensor(step)}},
            state={"tokens_seen": 100 * step},
        )


if __name__ == "__main__":
    main()
