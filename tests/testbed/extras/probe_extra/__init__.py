"""A throwaway klippy extra: proves that link_extra() installs a package.

[probe_extra]
message: ok      # optional

Registers the PROBE_EXTRA G-code command, the `probe_extra/ping` webhooks
endpoint and a `probe_extra` status object.  Imports nothing from klippy, so
it loads in every flavour.
"""


class ProbeExtra:
    def __init__(self, config):
        self.printer = config.get_printer()
        self.message = config.get("message", "ok")
        self.count = 0
        self.ready = False
        self.printer.register_event_handler("klippy:ready", self._handle_ready)
        gcode = self.printer.lookup_object("gcode")
        gcode.register_command("PROBE_EXTRA", self.cmd_PROBE_EXTRA,
                               desc="Test bed: answer from probe_extra")
        webhooks = self.printer.lookup_object("webhooks")
        webhooks.register_endpoint("probe_extra/ping", self._handle_ping)

    def _handle_ready(self):
        self.ready = True

    def cmd_PROBE_EXTRA(self, gcmd):
        self.count += 1
        gcmd.respond_info("probe_extra: %s count=%d" % (self.message, self.count))

    def _handle_ping(self, web_request):
        web_request.send({"pong": True, "count": self.count})

    def get_status(self, eventtime):
        return {"count": self.count, "message": self.message, "ready": self.ready}


def load_config(config):
    return ProbeExtra(config)
