"""The Hugging Face ``Trainer`` as peftlab runs it: checkpoints that appear all at once, and an optimizer
that the caller or the method may build (``peftlab.training.TrainingParts.optimizer``,
``Method.optimizer_parameter_groups``).

Imported only by ``peftlab.training.build_trainer``: importing it imports transformers' Trainer.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from transformers import Trainer


class PeftlabTrainer(Trainer):
    """A ``Trainer`` with atomic checkpoints and an optional optimizer factory.

    ``optimizer_factory(model) -> torch.optim.Optimizer`` replaces the Trainer's own AdamW (LoRA+'s
    parameter groups, a benchmark's optimizer). It is called where the Trainer would build its optimizer,
    so DeepSpeed and DDP wrap it exactly as they wrap the default one, and the Trainer still builds the
    learning-rate schedule around it.
    """

    def __init__(self, *args, optimizer_factory: Callable | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.optimizer_factory = optimizer_factory

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.optimizer_factory is not None:
            self.optimizer = self.optimizer_factory(self.model if model is None else model)
            return self.optimizer
        return super().create_optimizer(model)

    def _save_checkpoint(self, model, trial):
        """``Trainer`` writes ``checkpoint-N/`` file by file, so a kill mid-save leaves a folder that looks
        complete but is not, and ``--resume`` would load it. Here each checkpoint is written into a staging
        folder and renamed into place only when complete (rename is atomic)."""
        import torch.distributed as dist

        run_dir = Path(self._get_output_dir(trial=trial))
        staging_root = run_dir / ".staging"
        name = f"checkpoint-{self.state.global_step}"
        original = self.args.output_dir
        if self.args.should_save:
            shutil.rmtree(staging_root / name, ignore_errors=True)
        self.args.output_dir = str(staging_root)
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = original
            self.args.save_total_limit = limit
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank has written its shard (DeepSpeed) before the rename
        if self.args.should_save:
            target = run_dir / name
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging_root / name, target)
            fsync_dir(run_dir)
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=limit, use_mtime=False)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()


AtomicCheckpointTrainer = PeftlabTrainer  # the name it had inside peftlab.training


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: some file systems refuse to open folders)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def last_checkpoint(checkpoints: Path) -> str | None:
    """The newest complete ``checkpoint-N`` folder under ``checkpoints`` (None when there is none)."""
    from transformers.trainer_utils import get_last_checkpoint

    if not checkpoints.is_dir():
        return None
    return get_last_checkpoint(str(checkpoints))
