"""`vampnet_pl.training.app` where one rank gets SIGTERM mid-step (for tests/test_requeue.py).

    SIGTERM_OUT=DIR SIGTERM_RANK=1 SIGTERM_STEP=3 python tests/sigterm_train.py [hydra overrides]

Rank ``SIGTERM_RANK`` sends itself SIGTERM in step ``SIGTERM_STEP``, between forward and backward (the other
rank is then on its way into the gradient all-reduce). Every rank writes how it ended to ``DIR/rank<r>.json``.
Lightning relaunches this script for every rank.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import lightning as L

from vampnet_pl.training import app


class SigtermAtStep(L.Callback):
    def __init__(self):
        self.rank, self.step = int(os.environ["SIGTERM_RANK"]), int(os.environ["SIGTERM_STEP"])

    def on_before_backward(self, trainer, *args) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)

    def _write(self, trainer, ended: str) -> None:
        out = Path(os.environ["SIGTERM_OUT"]) / f"rank{trainer.global_rank}.json"
        out.write_text(json.dumps({"ended": ended, "global_step": trainer.global_step}))

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._write(trainer, type(exception).__name__)

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(trainer, "finished")


def build(cfg):
    module, datamodule, trainer, resume_from = build_app(cfg)
    trainer.callbacks.append(SigtermAtStep())
    return module, datamodule, trainer, resume_from


if __name__ == "__main__":
    build_app, app.build = app.build, build
    sys.argv[0] = __file__
    app.main()
