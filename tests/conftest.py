import sys
from pathlib import Path

# tests import their small helpers (toy_data, ...) as plain modules
sys.path.insert(0, str(Path(__file__).parent))
