"""Test-suite setup: shared helpers in tests/ (e.g. `from plans import random_plan`) import from any subfolder."""
import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
