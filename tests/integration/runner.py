"""Runs one master for a test: ``python -m tests.integration.runner SETTINGS_JSON``.

The JSON holds prefork settings plus "app" and "ready_file": the when_ready hook writes the
master's pid and bound listener names there, so the test knows ports bound to 0.
"""

from __future__ import annotations

import json
import os
import sys

import prefork
from prefork import log
from prefork.config import make_settings
from prefork.errors import PreforkError


def main() -> int:
    options = json.loads(sys.argv[1])
    app = options.pop("app")
    ready_file = options.pop("ready_file")
    service_options = options.pop("service_options", None)

    def when_ready(arbiter):
        data = {"pid": os.getpid(), "listeners": [listener.name for listener in arbiter.listeners]}
        tmp = f"{ready_file}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, ready_file)

    try:
        settings = make_settings({**options, "when_ready": when_ready})
        log.setup(settings)  # as the CLI does
        return prefork.serve(app, settings=settings, service_options=service_options)
    except PreforkError as exc:  # as the CLI reports it: the message, no traceback
        print(f"prefork: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
