import os
import sys
from pathlib import Path

import pytest
import torch

# Tiny-model tests run in this process: on a loaded 2-core machine, torch's thread pool makes a 32x32
# matmul thousands of times slower than one thread. Real-model runs are subprocesses and keep all cores.
torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The offline datasets (../shared/data or $PEFTLAB_DATA_DIR). Tests that need real data use this."""
    value = os.environ.get("PEFTLAB_DATA_DIR") or str(ROOT.parent / "shared" / "data")
    path = Path(value)
    if not (path / "glue" / "SST-2" / "train.tsv").is_file():
        pytest.fail(f"Real data not found at {path}: set PEFTLAB_DATA_DIR to the shared data folder.")
    return path


@pytest.fixture(autouse=True)
def _restore_environment():
    """Each test starts from the same environment: code under test (DeepSpeed without a launcher, for
    one) may set RANK/WORLD_SIZE/MASTER_PORT in os.environ, which would make later subprocesses try to
    join a process group that no longer exists."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
