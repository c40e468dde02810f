"""Any dataset on the Hugging Face Hub (or a local dataset folder), read with the same column options as files.

    peftlab train --dataset ORG/NAME [--dataset-config C] [--train-split train --dev-split validation] \\
        --prompt-column instruction --response-column output --model smollm2

``--dataset`` alone selects this task (``--task hub``). The rows come from ``datasets.load_dataset(ORG/NAME,
C)``; the forms, their columns and scores are those of your own files (:mod:`peftlab.tasks.own`). Dev is
``--dev-split``, else the dataset's ``validation``, ``test`` or ``dev`` split, else a seeded ``--dev-fraction``
of the training split. Errors name the dataset, the split and the record (``org/name (train split), record 7``).

When the Hub cannot be reached (``HF_HUB_OFFLINE``, or no connection within a few seconds) the task says so in
one sentence instead of waiting for ``datasets``' retries, and points at local files (``--task jsonl
--train-file ...``). A dataset already in the local ``datasets`` cache loads offline.
"""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse

from peftlab.errors import PeftlabError
from peftlab.tasks.own import OwnDataTask, Rows

DEV_SPLITS = ("validation", "test", "dev")
REACH_TIMEOUT_S = 3.0


def hub_unreachable() -> str | None:
    """Why the Hub cannot be used now (offline mode, or no connection within seconds); None when it can."""
    import os

    from huggingface_hub import constants

    from peftlab.hub import TRUE, endpoint

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(endpoint())
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                      timeout=REACH_TIMEOUT_S):
            return None
    except OSError as error:
        return "timed out" if isinstance(error, socket.timeout) else (error.strerror or type(error).__name__).lower()


class HubDatasetTask(OwnDataTask):
    """Any task kind over a ``datasets.load_dataset`` dataset."""

    source_flags = {"train": "--train-split", "dev": "--dev-split"}

    def __init__(self, name: str = "hub", **options):
        self._splits = None
        self.example = ("peftlab train --dataset ORG/NAME --prompt-column instruction --response-column output "
                        "--model smollm2")
        super().__init__(name, **options)
        self.hub_dataset = self.options.get("dataset")  # the model card's dataset
        self.hub_config = self.options.get("dataset_config")
        if self.hub_dataset:
            self.description = self.description.replace("your own data", f"dataset {self.hub_dataset}", 1)

    def _dataset(self):
        """The dataset's splits (a ``DatasetDict``), loaded once."""
        if self._splits is not None:
            return self._splits
        path = self.options.get("dataset")
        if not path:
            raise PeftlabError(f"Task '{self.name}' needs --dataset ORG/NAME (a Hugging Face Hub dataset, or a local "
                               f"dataset folder). Example: {self.example}.")
        import datasets

        local = Path(path).expanduser().exists()
        config = self.options.get("dataset_config")
        label = f"{path}{'/' + config if config else ''}"
        if not local:
            reason = hub_unreachable()
            if reason is not None and not _cached(path, config):
                raise PeftlabError(f"Cannot load dataset '{label}' from the Hugging Face Hub ({reason}); pass local "
                                   "files instead (--task jsonl --train-file train.jsonl [--dev-file dev.jsonl], or csv, "
                                   "tsv, json) with the same column options.")
        try:
            self._splits = datasets.load_dataset(str(Path(path).expanduser()) if local else path, config)
        except Exception as error:  # datasets raises many types (missing config, no such dataset, network)
            first = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
            raise PeftlabError(f"Cannot load dataset '{label}' ({type(error).__name__}: {first}); check the name "
                               "and --dataset-config, or pass local files (--task jsonl --train-file ...).") from None
        return self._splits

    def _split_name(self, which: str) -> str | None:
        splits = self._dataset()
        if which == "train":
            wanted = self.options.get("train_split") or "train"
        else:
            wanted = self.options.get("dev_split")
            if wanted is None:
                return next((name for name in DEV_SPLITS if name in splits), None)
        if wanted not in splits:
            flag = "--train-split" if which == "train" else "--dev-split"
            raise PeftlabError(f"Dataset '{self.options['dataset']}' has no split '{wanted}' ({flag}); its splits: "
                               f"{', '.join(splits)}.")
        return wanted

    def has_dev_source(self) -> bool:
        return self._split_name("dev") is not None

    def read_source(self, which: str) -> Rows:
        split = self._split_name(which)
        rows = self._dataset()[split]
        source = f"{self.options['dataset']} ({split} split)"
        return Rows(source=source, items=[(f"{source}, record {index + 1}", row) for index, row in enumerate(rows)],
                    columns=list(rows.column_names), header=None)


def _cached(path: str, config: str | None) -> bool:
    """Whether ``datasets`` has this dataset in its cache (then it loads without the Hub)."""
    try:
        from datasets import config as datasets_config

        folder = Path(datasets_config.HF_DATASETS_CACHE) / path.replace("/", "___")
        return folder.is_dir() and any(folder.iterdir())
    except Exception:  # noqa: BLE001 - any doubt: not cached
        return False
