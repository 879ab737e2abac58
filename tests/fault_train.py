"""`vampnet_pl.training.app` with one injected checkpoint-write fault (for tests/test_faults.py).

    FAULT=kill|enospc python tests/fault_train.py [hydra overrides]

On the first write into a path containing ``last.ckpt`` (single file: ``torch.save``; sharded:
``torch.distributed.checkpoint.save``), half the bytes are written, then either the whole process group
gets SIGKILL (as a node failure or SLURM would) or an ``OSError(ENOSPC)`` is raised, as a full disk does.
Lightning relaunches this script for every rank, so every rank carries the fault.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp


def _fault(target) -> None:
    if os.environ.get("FAULT") == "kill":
        os.killpg(os.getpgid(0), signal.SIGKILL)
    raise OSError(errno.ENOSPC, "No space left on device", str(target))


def _half_write(target) -> None:
    target = Path(target)
    if target.suffix == ".partial" or target.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        target = target / f"__{os.environ.get('RANK', '0')}_0.distcp"
    target.write_bytes(b"\0" * 4096)


real_save, real_dcp_save = torch.save, dcp.save


def save(obj, f, *args, **kwargs):
    if os.environ.get("FAULT") and isinstance(f, (str, os.PathLike)) and "last.ckpt" in str(f):
        _half_write(f)
        _fault(f)
    return real_save(obj, f, *args, **kwargs)


def dcp_save(state, *args, checkpoint_id=None, **kwargs):
    if os.environ.get("FAULT") and checkpoint_id is not None and "last.ckpt" in str(checkpoint_id):
        _half_write(checkpoint_id)
        _fault(checkpoint_id)
    return real_dcp_save(state, *args, checkpoint_id=checkpoint_id, **kwargs)


torch.save, dcp.save = save, dcp_save

if __name__ == "__main__":
    from vampnet_pl.training.app import main

    sys.argv[0] = __file__
    main()
