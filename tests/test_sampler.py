"""Length-grouped batches in a shuffled order (``peftlab.trainer.shuffled_length_groups``)."""

from __future__ import annotations

import random

import torch


def batches_of(indices, size):
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def test_same_batches_as_transformers_in_a_random_order_longest_first_short_last():
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from peftlab.trainer import shuffled_length_groups

    rng = random.Random(0)
    lengths = [rng.randint(3, 60) for _ in range(1003)]  # 1003 = 31 batches of 32 and one of 11
    ours = shuffled_length_groups(lengths, 32, generator=torch.Generator().manual_seed(7))
    theirs = get_length_grouped_indices(lengths, 32, generator=torch.Generator().manual_seed(7))
    assert sorted(ours) == list(range(len(lengths)))  # every example once
    mine, hf = batches_of(ours, 32), batches_of(theirs, 32)
    assert sorted(map(sorted, mine)) == sorted(map(sorted, hf))  # the very same batches: the same padding
    assert max(lengths) in [lengths[i] for i in mine[0]]
    assert len(mine[-1]) == 11 and sorted(mine[-1]) == sorted(hf[-1])
    # transformers walks each mega-batch from its longest batch to its shortest; here the order is random
    longest = [max(lengths[i] for i in batch) for batch in mine[:-1]]
    drops = sum(a > b for a, b in zip(longest, longest[1:]))
    assert 0.3 * len(longest) < drops < 0.7 * len(longest)
    hf_longest = [max(lengths[i] for i in batch) for batch in hf[:-1]]
    assert sum(a < b for a, b in zip(hf_longest, hf_longest[1:])) <= 5  # rises only where a mega-batch starts


def test_the_trainer_uses_it_when_grouping_by_length(tmp_path):
    import datasets
    from transformers import TrainingArguments

    from peftlab.trainer import PeftlabTrainer, ShuffledLengthGroupedSampler
    import tiny

    data = datasets.Dataset.from_dict({"input_ids": [[1] * n for n in range(2, 40)], "length": list(range(2, 40))})
    for strategy, expected in (("group_by_length", ShuffledLengthGroupedSampler), ("random", None)):
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, use_cpu=True,
                                 train_sampling_strategy=strategy, length_column_name="length", report_to=[])
        trainer = PeftlabTrainer(model=tiny.tiny_bert(), args=args, train_dataset=data)
        sampler = trainer._get_train_sampler()
        if expected is None:
            assert not isinstance(sampler, ShuffledLengthGroupedSampler)
        else:
            assert isinstance(sampler, expected) and len(list(sampler)) == len(data)


def test_ranks_take_the_one_process_order():
    """Two ranks of batch 4 (accelerate deals consecutive batches out to the ranks) see, step by step, the
    examples the one-process run with batch 8 sees."""
    from peftlab.trainer import shuffled_length_groups

    rng = random.Random(1)
    lengths = [rng.randint(3, 60) for _ in range(200)]
    two_ranks = shuffled_length_groups(lengths, 4, generator=torch.Generator().manual_seed(3), mega_batch_mult=4,
                                       processes=2)
    one = shuffled_length_groups(lengths, 8, generator=torch.Generator().manual_seed(3), mega_batch_mult=2)
    assert two_ranks == one
    alone = shuffled_length_groups(lengths, 4, generator=torch.Generator().manual_seed(3), mega_batch_mult=4)
    assert alone != one  # shuffling batches of 4 would split the steps differently
