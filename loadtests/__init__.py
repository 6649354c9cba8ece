"""Benchmarks and load tests of prefork (see each module's docstring for its command). Runs in: bench."""
