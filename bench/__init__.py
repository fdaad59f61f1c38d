"""Hand-run benchmarks of sidestep (``python -m bench``); not part of the test suite."""
