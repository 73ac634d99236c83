import sys
from pathlib import Path

# tests import their small helpers (toy_data, ...) as plain modules
sys.path.insert(0, str(Path(__file__).parent))

# session fixtures of the federation tests: the tiny dataset and a tiny foundation (built once)
from fed_fixtures import tiny, tiny_foundation  # noqa: E402,F401
