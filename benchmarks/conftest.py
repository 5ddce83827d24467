"""pytest configuration for the benchmarks (pyproject.toml's [tool.pytest.ini_options] belongs to the tests).

    pytest benchmarks -m "not slow"                     # 64^3 and 128^3 cases
    pytest benchmarks -m "not slow" --benchmark-disable # smoke run: every case once, untimed
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # `import cases` under any --import-mode
    sys.path.insert(0, str(HERE))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (the 160x192x224 cases); deselect with -m 'not slow'")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (only collected when torch.cuda.is_available())")
