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
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices


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

    def _get_train_sampler(self, train_dataset=None):
        """Length-grouped batches in a shuffled order (:class:`ShuffledLengthGroupedSampler`) where transformers
        would give its ``LengthGroupedSampler``; anything else as the Trainer makes it."""
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:
            return ShuffledLengthGroupedSampler(sampler.batch_size, lengths=sampler.lengths,
                                                generator=sampler.generator, processes=self.args.world_size)
        return sampler

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


def shuffled_length_groups(lengths: list[int], batch_size: int, generator=None, mega_batch_mult: int | None = None,
                           processes: int = 1) -> list[int]:
    """Indices whose consecutive ``batch_size`` slices hold examples of similar length, batches in random order.

    transformers' ``get_length_grouped_indices`` makes the same batches (a random permutation cut into
    mega-batches of up to 50 batches, each sorted by length) but keeps every mega-batch's batches in order of
    decreasing length, so each epoch walks from the longest sentences to the shortest a few times over: a
    curriculum nobody asked for, which cost LoRA on SST-2 about a point of accuracy against random batches
    (docs/performance.md). Here the batches themselves are shuffled, the batch with the longest example still
    first (an out-of-memory error shows at the first step, as transformers intends). Written here because
    neither transformers nor torch offers a sampler that groups by length and shuffles the groups.

    ``processes``: data-parallel ranks. Accelerate deals the sampler's consecutive batches out to the ranks, so
    one optimizer step takes ``processes`` batches in a row; those move together (a unit of ``batch_size x
    processes`` indices), which keeps an N-rank run on exactly the examples and order of the one-process run
    with the N-times larger batch (tests/test_distributed.py).
    """
    import torch

    grouped = get_length_grouped_indices(lengths, batch_size, mega_batch_mult=mega_batch_mult, generator=generator)
    unit = batch_size * max(1, int(processes))
    batches = [grouped[i:i + unit] for i in range(0, len(grouped), unit)]
    # the first unit holds the longest example (transformers puts it there); a short last unit stays last,
    # or every batch after it would straddle two length groups
    last = [batches.pop()] if len(batches) > 1 and len(batches[-1]) < unit else []
    if len(batches) < 2:
        return grouped
    rest = batches[1:]
    order = torch.randperm(len(rest), generator=generator).tolist()
    return batches[0] + [index for position in order for index in rest[position]] + [i for b in last for i in b]


class ShuffledLengthGroupedSampler(LengthGroupedSampler):
    """transformers' ``LengthGroupedSampler`` with its batches in a random order (:func:`shuffled_length_groups`)."""

    def __init__(self, *args, processes: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.processes = max(1, int(processes))

    def __iter__(self):
        return iter(shuffled_length_groups(self.lengths, self.batch_size, generator=self.generator,
                                           processes=self.processes))


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
