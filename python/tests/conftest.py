"""pytest setup for python/tests: goat_torch from this checkout (python/), the float64 judges from here."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]


def pytest_report_header(config):
    from reference64 import SEED
    return f"GOAT_TEST_SEED={SEED}"


def pytest_terminal_summary(terminalreporter):
    from reference64 import SEED
    terminalreporter.write_line(f"GOAT_TEST_SEED={SEED} (set it to replay this run's inputs)")
