"""`vampnet_pl.training.app` with a simulated device memory for batch sizing (for tests/test_batch_size.py).

    PROBE_OUT=DIR python tests/memory_probe_train.py [hydra overrides]

Every rank reads peaks from :class:`FakeMemory` (``base + per_example x batch``; rank 1 needs more per example,
as a rank with a busier device would) and writes what it decided and the batches it trained on to
``DIR/rank<r>.json``. Lightning relaunches this script for every rank.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from vampnet_pl.training import app
from vampnet_pl.training.batch_size import AutoBatchSize

GIB = 2**30


class FakeMemory:
    """Peak bytes ``base + per_example x batch`` of the probed batch; out of memory above ``capacity``."""

    def __init__(self, base: int, per_example: int, capacity: int):
        self.base, self.per_example, self._capacity = base, per_example, capacity
        self.started: list[int] = []

    def capacity(self) -> int:
        return self._capacity

    def in_use(self) -> int:
        return self.base

    def start(self, batch_size: int) -> None:
        self.started.append(batch_size)
        if self.base + self.per_example * batch_size > self._capacity:
            raise RuntimeError("CUDA out of memory (simulated)")

    def peak(self) -> int:
        return self.base + self.per_example * self.started[-1]

    @staticmethod
    def is_out_of_memory(err: BaseException) -> bool:
        return "out of memory" in str(err)


class RecordingAutoBatchSize(AutoBatchSize):
    def __init__(self, config, resume_from=None):
        rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
        memory = FakeMemory(GIB, (1 + rank) * GIB, 16 * GIB)
        if os.environ.get("PROBE_FAILS_ON_RANK") == str(rank):
            memory.start = lambda batch_size: (_ for _ in ()).throw(ValueError("a probe bug (simulated)"))
        super().__init__(config, resume_from, memory=memory)
        self.batches: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(int(batch["codes"].shape[0]))

    def on_train_end(self, trainer, pl_module) -> None:
        out = Path(os.environ["PROBE_OUT"]) / f"rank{trainer.global_rank}.json"
        out.write_text(json.dumps({
            "split": [self.split.micro_batch, self.split.accumulation, self.split.ranks],
            "probed": self.memory.started, "batches": self.batches, "global_step": trainer.global_step,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
        }))


if __name__ == "__main__":
    app.AutoBatchSize = RecordingAutoBatchSize
    sys.argv[0] = __file__
    app.main()
