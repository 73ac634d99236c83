import sys
from pathlib import Path

import pytest

# tests import their small helpers (toy_data, ...) as plain modules
sys.path.insert(0, str(Path(__file__).parent))

# session fixtures of the federation tests: the tiny dataset and a tiny foundation (built once)
from fed_fixtures import tiny, tiny_foundation  # noqa: E402,F401


@pytest.fixture(scope="module")
def one_thread():
    """Tests of many tiny training steps use it (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    one thread avoids contention on a busy host."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
