"""The one benchmark driver: ``python -m loadtests.bench [compare|core|master|slow-clients|tls|asyncio]``. Runs in: bench.

Run from the repository root, on Linux. Each suite (``loadtests/suites/``) prints its report and
writes it to its file under ``docs/`` (``--output -``: none); ``--quick`` runs it with small counts
and writes nothing, for development. Without a suite, ``compare``.

| suite | writes | takes |
|---|---|---|
| ``compare`` | ``docs/benchmarks.md``, ``docs/benchmarks.png`` | about 9 minutes |
| ``core`` | ``docs/benchmarks-core.md`` | about a minute |
| ``master`` | ``docs/benchmarks-master.md`` | about a minute and a half |
| ``slow-clients`` | ``docs/benchmarks-slow-clients.md`` | about half a minute |
| ``tls`` | ``docs/benchmarks-tls.md`` | about three minutes |
| ``asyncio`` | ``docs/benchmarks-asyncio.md`` | about two minutes |
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from types import ModuleType

from loadtests.harness import COMMAND, LOAD_BEFORE, progress
from loadtests.suites import aio, compare, core, master, slow_clients, tls

SUITES: dict[str, ModuleType] = {"compare": compare, "core": core, "master": master, "slow-clients": slow_clients,
                                 "tls": tls, "asyncio": aio}


def parse_args(argv: list[str]) -> argparse.Namespace:
    quick = "--quick" in argv
    parser = argparse.ArgumentParser(prog=COMMAND, description=(__doc__ or "").split("\n", 1)[0])
    commands = parser.add_subparsers(dest="suite")
    for name, module in SUITES.items():
        sub = commands.add_parser(name, help=(module.__doc__ or "").split(". Runs in")[0])
        sub.add_argument("--quick", action="store_true", help="small counts, no file written (development)")
        module.add_arguments(sub, quick)
        sub.add_argument("--output", default="-" if quick else str(module.OUTPUT),
                         help="report file ('-': none)")
    return parser.parse_args(argv)


def _exit_on_term(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that stops the server


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in (*SUITES, "-h", "--help"):
        argv = ["compare", *argv]
    settings = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_term)
    started, LOAD_BEFORE[0] = time.monotonic(), os.getloadavg()[0]
    SUITES[settings.suite].run(settings, argv)
    progress(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
