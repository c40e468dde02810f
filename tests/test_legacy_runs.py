"""Run folders saved by an earlier peftlab still load and predict exactly as they did.

tests/data/legacy-407067a holds five short runs (lora, ia3, p-tuning-v2 in peft's format; the bottleneck
adapter and BitFit in peftlab's own) trained on the real minilm and SST-2 by commit 407067a, the main
before methods declared their facts and task kinds became a type, together with the predictions that
commit made for three sentences. The current code must read the manifests (kind strings, label names
"0"/"1" as GLUE runs stored them then) and reproduce those probabilities.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

LEGACY = Path(__file__).parent / "data" / "legacy-407067a"
EXPECTED = json.loads((LEGACY / "predictions.json").read_text())


@pytest.mark.real
@pytest.mark.parametrize("method", sorted(EXPECTED["predictions"]))
def test_legacy_run_predicts_as_before(method, tmp_path):
    import peftlab

    run = tmp_path / f"{method}-sst2"
    shutil.copytree(LEGACY / f"{method}-sst2", run)  # predict must not need to write into the fixture
    got = peftlab.predict(str(run), EXPECTED["texts"])
    expected = EXPECTED["predictions"][method]
    assert [row["label"] for row in got] == [row["label"] for row in expected]
    for new, old in zip(got, expected):
        assert set(new["probabilities"]) == set(old["probabilities"])
        for label, probability in old["probabilities"].items():
            assert new["probabilities"][label] == pytest.approx(probability, abs=1e-5), (method, new["text"])
