"""Ending the process at once, with a given status."""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


def exit_now(code: int) -> NoReturn:
    """Flush logging and stdio, then ``os._exit(code)``: interpreter finalization is skipped
    on purpose. Native threads (gloo's, pyarrow's readers) can still be running then, and one
    that needs the GIL during finalization aborts the process ("terminate called without an
    active exception", exit 134 instead of ``code``)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
