"""`vampnet_pl.training.app` where one rank gets a signal mid-step (for tests/test_requeue.py).

    SIGNAL_OUT=DIR SIGNAL_RANK=1 SIGNAL_STEP=3 [SIGNAL=SIGUSR1] python tests/signal_train.py [hydra overrides]

Rank ``SIGNAL_RANK`` sends itself ``SIGNAL`` (default SIGTERM) in step ``SIGNAL_STEP``, between forward and
backward (the other rank is then on its way into the gradient all-reduce). Every rank writes how it ended, at
which step, and how many validation passes ran after the signal to ``DIR/rank<r>.json``. Lightning relaunches
this script for every rank.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import lightning as L

from vampnet_pl.training import app


class SignalAtStep(L.Callback):
    def __init__(self):
        self.rank, self.step = int(os.environ["SIGNAL_RANK"]), int(os.environ["SIGNAL_STEP"])
        self.signum = signal.Signals[os.environ.get("SIGNAL", "SIGTERM")]
        self.validations_after = 0

    def on_before_backward(self, trainer, *args) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)

    def on_validation_start(self, trainer, *args) -> None:
        self.validations_after += not trainer.sanity_checking and trainer.global_step > self.step

    def _write(self, trainer, ended: str) -> None:
        out = Path(os.environ["SIGNAL_OUT"]) / f"rank{trainer.global_rank}.json"
        out.write_text(json.dumps({"ended": ended, "global_step": trainer.global_step,
                                   "validations_after": self.validations_after}))

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._write(trainer, type(exception).__name__)

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(trainer, "finished")


def build(cfg):
    module, datamodule, trainer, resume_from = build_app(cfg)
    trainer.callbacks.append(SignalAtStep())
    return module, datamodule, trainer, resume_from


if __name__ == "__main__":
    build_app, app.build = app.build, build
    sys.argv[0] = __file__
    app.main()
