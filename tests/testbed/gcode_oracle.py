"""Ask a klippy flavour's own G-code dispatcher what lines would run.

Run with the flavour's Python (its venv holds the `klippy` package):

    <venv>/bin/python tests/testbed/gcode_oracle.py < request.json

The request is {"commands": [...], "lines": [...]}: every name in
"commands" (and every command klippy registers by itself) gets a handler
that only records its call.  The answer, on stdout, has one entry per line:
{"lookups": [...], "calls": [...]}: the command names klippy looked up for
the line and the handlers that actually ran (after klippy's own parameter
parsing, which may refuse a line).  Nothing else of klippy runs.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import sys

# This file's folder holds the test bed's own klippy.py: keep it out of the
# way of the installed package
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
gcode = importlib.import_module("klippy.gcode")


class FakeReactor:
    def mutex(self):
        return contextlib.nullcontext()


class FakePrinter:
    command_error = gcode.CommandError

    def get_start_args(self):
        return {}

    def register_event_handler(self, event, callback):
        pass

    def get_reactor(self):
        return FakeReactor()

    def send_event(self, event, *args):
        pass

    def config_error(self, msg):
        return ValueError(msg)

    def invoke_shutdown(self, msg):
        pass

    def get_state_message(self):
        return "not ready", "not ready"


class RecordingHandlers(dict):
    """klippy's handler table, noting every name looked up."""

    def __init__(self, handlers, lookups):
        super().__init__(handlers)
        self.lookups = lookups

    def get(self, key, default=None):
        self.lookups.append(key)
        return super().get(key, default)


def dispatcher(names, calls):
    gd = gcode.GCodeDispatch(FakePrinter())
    for name in sorted(set(names) | set(gd.ready_gcode_handlers)):
        gd.register_command(name, None)
        gd.register_command(name, lambda gcmd, n=name: calls.append(n),
                            when_not_ready=True, desc="recorded")
    gd._handle_ready()
    return gd


def run_line(gd, line, lookups, calls):
    del lookups[:], calls[:]
    with contextlib.suppress(gd.error):
        gd._process_commands([line], need_ack=False)
    return {"lookups": list(lookups), "calls": list(calls)}


def main():
    logging.disable(logging.CRITICAL)
    request = json.load(sys.stdin)
    lookups, calls = [], []
    gd = dispatcher(request["commands"], calls)
    gd.gcode_handlers = RecordingHandlers(gd.gcode_handlers, lookups)
    answers = [run_line(gd, line, lookups, calls)
               for line in request["lines"]]
    json.dump(answers, sys.stdout)


if __name__ == "__main__":
    main()
