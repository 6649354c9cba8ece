"""The benchmark suites, one module each, run by ``python -m loadtests.bench SUITE``. Runs in: bench."""
