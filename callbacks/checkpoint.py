"""last.ckpt: the run's latest state, written after every validation and at the end of fit.

Lightning's `save_last` refreshes last.ckpt only when a best (top-k) checkpoint is saved: after
an epoch that is not the best, or when fit stops at max_steps between validations, last.ckpt
stays behind and `resume=true` would continue from an older state. This callback owns the file
instead (`model_checkpoint` keeps the best), and writes it once more when fit ends.
"""
from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    def __init__(self, dirpath: str | None = None) -> None:
        super().__init__(dirpath=dirpath, filename="last", monitor=None, save_top_k=1,
                         enable_version_counter=False, save_on_train_epoch_end=False)

    def on_train_end(self, trainer, pl_module) -> None:
        # also after fast_dev_run (which otherwise saves nothing), so its run can be evaluated
        if self._last_global_step_saved != trainer.global_step:
            self._save_none_monitor_checkpoint(trainer, self._monitor_candidates(trainer))
