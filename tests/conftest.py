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

# The slowest files first (measured: `pytest --durations`, idle 2-core machine), so that with `make test`'s two
# xdist workers (`--dist loadfile`: a whole file per worker) the long ones start early and both workers end
# together; without xdist the order changes nothing but when each file runs.
SLOWEST_FIRST = ("test_labs.py", "test_chat.py", "test_distributed.py", "test_training.py", "test_compare.py",
                 "test_multinode.py", "test_fsdp.py", "test_squad.py", "test_compare_suite.py", "test_adversarial.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: index for index, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))  # stable within a file


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
