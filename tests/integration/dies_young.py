"""An app whose import kills the worker at once: the master must back off, not fork in a loop."""

import os

os._exit(7)
