"""last.ckpt: the run's latest state, written after every validation and at the end of fit.

Lightning's `save_last` refreshes last.ckpt only when a best (top-k) checkpoint is saved: after
an epoch that is not the best, or when fit stops at max_steps between validations, last.ckpt
stays behind and `resume=true` would continue from an older state. This callback owns the file
instead (`model_checkpoint` keeps the best), and writes it once more when fit ends.

A stop at `trainer.max_steps` in mid-epoch is saved at its last batch, not when fit ends: by then
Lightning has closed the epoch (its epoch-end hooks run, the epoch counter moves on), so a resume
would skip the rest of the epoch's batches and start the next one.
"""
from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint

from common.lightning_private import save_checkpoint_now, step_last_saved


class LastCheckpoint(ModelCheckpoint):
    def __init__(self, dirpath: str | None = None) -> None:
        super().__init__(dirpath=dirpath, filename="last", monitor=None, save_top_k=1,
                         enable_version_counter=False, save_on_train_epoch_end=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        stopped = trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps
        if stopped and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            save_checkpoint_now(self, trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        # also after fast_dev_run (which otherwise saves nothing), so its run can be evaluated
        if step_last_saved(self) != trainer.global_step:
            save_checkpoint_now(self, trainer)
