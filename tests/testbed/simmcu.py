"""A simulated Klipper micro-controller on a pseudo-terminal.

klippy talks to it exactly as to a real board (``[mcu] serial: <pty>``): the
simulator speaks Klipper's serial protocol (framing, sequence numbers, acks
and naks, a data dictionary served by ``identify``) and implements the
commands a cartesian printer with two heaters uses.  Messages are encoded and
decoded with klippy's own ``msgproto`` module.

Modelled: a free-running 20 MHz clock, digital and PWM outputs, ADC inputs
with periodic reports and range checks, heaters as first-order thermal
models (pins and constants in default_heaters()) read back through a 100k
NTC on a 4.7k pull-up following klippy's ``Generic 3950`` curve, steppers
(position accounting from the queued steps, no timing enforcement),
buttons (input pins whose level a test sets, e.g. a filament switch; at
its pull-up's level until set), endstops and trsync (an endstop triggers
after its homing stepper moved ``--endstop-steps`` steps, then remembers
where it is, so later homings trigger at the same place), shutdown /
``is_shutdown``, ``stats``, ``reset`` and ``config_reset``.

A control socket (unix, one JSON object per line, answered with one JSON
line) lets tests steer it::

    {"cmd": "ping"}
    {"cmd": "shutdown", "reason": "Timer too close"}
    {"cmd": "set_heater", "heater": "extruder", "temp": 250.0}   # null: release
    {"cmd": "heater_fault", "heater": "extruder", "fault": "open"}
        # fault: "open" | "short" (ADC out of range) | "no_power" | null
    {"cmd": "set_ambient", "temp": 25.0}
    {"cmd": "set_endstop_steps", "steps": 400}
    {"cmd": "set_pin", "pin": "gpio30", "value": 0}  # an input's level, as
        # read by buttons (filament_switch_sensor, gcode_button)
    {"cmd": "mute", "on": true}        # stop answering the host entirely
    {"cmd": "reset"}                   # power-cycle (after a mute, klippy
                                       # cannot reset it by command)
    {"cmd": "stats"}

Run: ``python -m tests.testbed.simmcu --pty PATH --control SOCKPATH``.  It
prints ``READY`` on stdout once both paths exist.
"""

from __future__ import annotations

import argparse
import collections
import heapq
import itertools
import json
import logging
import math
import os
import selectors
import signal
import socket
import sys
import time
import tty
import zlib
from typing import Any, Callable

from klippy import msgproto

CLOCK_FREQ = 20_000_000
ADC_MAX = 4095
PWM_MAX = 255
MOVE_COUNT = 1024
STATS_SUMSQ_BASE = 256
STATS_INTERVAL = 5.0
MCU_VERSION = "simmcu-1.0"

MESSAGE_MIN = msgproto.MESSAGE_MIN
MESSAGE_MAX = msgproto.MESSAGE_MAX
MESSAGE_DEST = msgproto.MESSAGE_DEST
MESSAGE_SEQ_MASK = msgproto.MESSAGE_SEQ_MASK
MESSAGE_SYNC = msgproto.MESSAGE_SYNC
MESSAGE_TRAILER_SIZE = msgproto.MESSAGE_TRAILER_SIZE

# Format strings must match klippy's byte for byte.
COMMANDS = [
    "identify offset=%u count=%c",
    "get_uptime",
    "get_clock",
    "get_config",
    "allocate_oids count=%c",
    "finalize_config crc=%u",
    "config_reset",
    "reset",
    "emergency_stop",
    "clear_shutdown",
    "debug_nop",
    "config_digital_out oid=%c pin=%u value=%c default_value=%c max_duration=%u",
    "set_digital_out pin=%u value=%c",
    "update_digital_out oid=%c value=%c",
    "queue_digital_out oid=%c clock=%u on_ticks=%u",
    "set_digital_out_pwm_cycle oid=%c cycle_ticks=%u",
    "config_pwm_out oid=%c pin=%u cycle_ticks=%u value=%hu default_value=%hu"
    " max_duration=%u",
    "set_pwm_out pin=%u cycle_ticks=%u value=%hu",
    "queue_pwm_out oid=%c clock=%u value=%hu",
    "config_analog_in oid=%c pin=%u",
    "query_analog_in oid=%c clock=%u sample_ticks=%u sample_count=%c"
    " rest_ticks=%u min_value=%hu max_value=%hu range_check_count=%c",
    "config_stepper oid=%c step_pin=%c dir_pin=%c invert_step=%c"
    " step_pulse_ticks=%u",
    "queue_step oid=%c interval=%u count=%hu add=%hi",
    "set_next_step_dir oid=%c dir=%c",
    "reset_step_clock oid=%c clock=%u",
    "stepper_get_position oid=%c",
    "stepper_stop_on_trigger oid=%c trsync_oid=%c",
    "config_endstop oid=%c pin=%c pull_up=%c",
    "endstop_home oid=%c clock=%u sample_ticks=%u sample_count=%c"
    " rest_ticks=%u pin_value=%c trsync_oid=%c trigger_reason=%c",
    "endstop_query_state oid=%c",
    "config_trsync oid=%c",
    "trsync_start oid=%c report_clock=%u report_ticks=%u expire_reason=%c",
    "trsync_set_timeout oid=%c clock=%u",
    "trsync_trigger oid=%c reason=%c",
    "config_buttons oid=%c button_count=%c",
    "buttons_add oid=%c pos=%c pin=%u pull_up=%c",
    "buttons_query oid=%c clock=%u rest_ticks=%u retransmit_count=%c"
    " invert=%c",
    "buttons_ack oid=%c count=%c",
]
RESPONSES = [
    "identify_response offset=%u data=%.*s",
    "uptime high=%u clock=%u",
    "clock clock=%u",
    "config is_config=%c crc=%u is_shutdown=%c move_count=%hu",
    "shutdown clock=%u static_string_id=%hu",
    "is_shutdown static_string_id=%hu",
    "starting",
    "stats count=%u sum=%u sumsq=%u",
    "analog_in_state oid=%c next_clock=%u value=%hu",
    "stepper_position oid=%c pos=%i",
    "endstop_state oid=%c homing=%c next_clock=%u pin_value=%c",
    "trsync_state oid=%c can_trigger=%c trigger_reason=%c clock=%u",
    "buttons_state oid=%c ack_count=%c state=%*s",
]
# Commands the firmware still runs while shut down (HF_IN_SHUTDOWN).
ALLOWED_IN_SHUTDOWN = {
    "identify", "get_uptime", "get_clock", "get_config", "emergency_stop",
    "clear_shutdown", "reset", "config_reset", "debug_nop",
    "stepper_get_position", "endstop_query_state", "trsync_trigger",
}
# Shutdown reasons the firmware can report (static_string_id enumeration).
STATIC_STRINGS = [
    "Timer too close",
    "Command request",
    "ADC out of range",
    "Invalid command",
    "Invalid oid type",
    "Can't assign oid",
    "oids already allocated",
    "Missed scheduling of next digital out event",
    "Scheduled digital out event will exceed max_duration",
    "Stepper too far in past",
    "Rescheduled timer in the past",
    "Move queue overflow",
    "config_reset only available when shutdown",
    "Shutdown cleared when not shutdown",
    "Watchdog timer!",
    "Thermocouple reader fault",
    "Heater fault",
]
GPIO_COUNT = 48
ANALOG_COUNT = 16
INPUT_PINS = frozenset("gpio%d" % (i,) for i in range(GPIO_COUNT))

# Thermistor: a 100k NTC on a 4.7k pull-up, following klippy's own
# "Generic 3950" definition (temperature_sensors.cfg: Steinhart-Hart through
# 25C/100k, 150C/1770, 250C/230), so `sensor_type: Generic 3950` reads the
# simulated temperature back exactly.
NTC_POINTS = ((25.0, 100000.0), (150.0, 1770.0), (250.0, 230.0))
PULLUP = 4700.0
KELVIN = 273.15


class McuShutdown(Exception):
    """Raised inside command processing once the MCU has shut down."""


def _steinhart_hart(points: tuple[tuple[float, float], ...]) -> tuple[float, ...]:
    """Coefficients c1, c2, c3 of 1/T = c1 + c2*ln(R) + c3*ln(R)^3."""
    (t1, r1), (t2, r2), (t3, r3) = points
    inv_t1, inv_t2, inv_t3 = (1.0 / (t + KELVIN) for t in (t1, t2, t3))
    ln_r1, ln_r2, ln_r3 = math.log(r1), math.log(r2), math.log(r3)
    inv_t12, inv_t13 = inv_t1 - inv_t2, inv_t1 - inv_t3
    ln_r12, ln_r13 = ln_r1 - ln_r2, ln_r1 - ln_r3
    ln3_r12, ln3_r13 = ln_r1**3 - ln_r2**3, ln_r1**3 - ln_r3**3
    c3 = (inv_t12 - inv_t13 * ln_r12 / ln_r13) / (ln3_r12 - ln3_r13 * ln_r12 / ln_r13)
    c2 = (inv_t12 - c3 * ln3_r12) / ln_r12
    c1 = inv_t1 - c2 * ln_r1 - c3 * ln_r1**3
    return c1, c2, c3


NTC_COEFFS = _steinhart_hart(NTC_POINTS)


def ntc_resistance(temp_c: float) -> float:
    """Invert Steinhart-Hart (Newton's method on x = ln R)."""
    c1, c2, c3 = NTC_COEFFS
    inv_t = 1.0 / (max(temp_c, -100.0) + KELVIN)
    x = math.log(NTC_POINTS[0][1])
    for _ in range(50):
        f = c1 + c2 * x + c3 * x**3 - inv_t
        x_new = x - f / (c2 + 3.0 * c3 * x * x)
        if abs(x_new - x) < 1e-12:
            break
        x = x_new
    return math.exp(x)


def ntc_adc_fraction(temp_c: float) -> float:
    """ADC reading (0..1) of the NTC divider at temp_c."""
    r = ntc_resistance(temp_c)
    return r / (r + PULLUP)


class ThermalModel:
    """First-order heater: dT/dt = (ambient + gain*duty - T) / tau."""

    def __init__(self, name: str, pwm_pin: str, adc_pin: str, tau: float,
                 gain: float, ambient: float = 25.0) -> None:
        self.name = name
        self.pwm_pin = pwm_pin
        self.adc_pin = adc_pin
        self.tau = tau
        self.gain = gain
        self.ambient = ambient
        self.temp = ambient
        self.duty = 0.0
        self.pinned: float | None = None
        self.fault: str | None = None
        self.last_time = 0.0

    def advance(self, t: float) -> None:
        dt = t - self.last_time
        if dt <= 0.0:
            return
        self.last_time = t
        if self.pinned is not None:
            self.temp = self.pinned
            return
        power = 0.0 if self.fault == "no_power" else self.duty
        target = self.ambient + self.gain * power
        self.temp = target + (self.temp - target) * math.exp(-dt / self.tau)

    def adc_fraction(self) -> float:
        if self.fault == "open":
            return 1.0
        if self.fault == "short":
            return 0.0
        return ntc_adc_fraction(self.temp)


def default_heaters() -> list[ThermalModel]:
    """The test printer's heaters (pins as in printer_cfg.py).

    Fast but not too fast: klippy acts on a reading ~0.3-0.6 s late, so with
    `control: watermark` the hotend swings about +-20 C around its target.
    Full power settles at 505 C (hotend) and 135 C (bed); 25 -> 200 C takes
    about 2.7 s, 25 -> 50 C about 1.3 s (plus klippy's 1 s smoothing).
    """
    return [
        ThermalModel("extruder", "gpio20", "analog0", tau=6.0, gain=480.0),
        ThermalModel("heater_bed", "gpio21", "analog1", tau=5.0, gain=110.0),
    ]


HEATER_ALIASES = {"hotend": "extruder", "bed": "heater_bed"}


class Timer:
    __slots__ = ("clock", "func", "cancelled")

    def __init__(self, clock: int, func: Callable[[int], None]) -> None:
        self.clock = clock
        self.func = func
        self.cancelled = False


class Output:
    """A digital output, soft-PWM output or hardware PWM output."""

    def __init__(self, oid: int, pin: str, value: float, default: float,
                 hw_pwm: bool = False) -> None:
        self.oid = oid
        self.pin = pin
        self.duty = value
        self.default = default
        self.hw_pwm = hw_pwm
        self.cycle_ticks = 0
        self.pending: list[Timer] = []


class AnalogIn:
    def __init__(self, oid: int, pin: str) -> None:
        self.oid = oid
        self.pin = pin
        self.timer: Timer | None = None
        self.sample_count = 0
        self.rest_ticks = 0
        self.min_value = 0
        self.max_value = 0
        self.range_check_count = 0
        self.invalid_count = 0
        self.last_value = 0


class Move:
    __slots__ = ("base", "interval", "count", "add", "sign", "end")

    def __init__(self, base: int, interval: int, count: int, add: int,
                 sign: int) -> None:
        self.base = base
        self.interval = interval
        self.count = count
        self.add = add
        self.sign = sign
        self.end = self.step_time(count)

    def step_time(self, k: int) -> int:
        """Clock of step k (1-based); k=0 is the base clock."""
        return self.base + k * self.interval + self.add * k * (k - 1) // 2

    def steps_upto(self, clock: int) -> int:
        """Number of this move's steps at or before clock."""
        if clock >= self.end:
            return self.count
        if clock < self.base + self.interval:
            return 0
        lo, hi = 0, self.count  # invariant: step_time(lo) <= clock
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.step_time(mid) <= clock:
                lo = mid
            else:
                hi = mid - 1
        return lo


class Stepper:
    def __init__(self, oid: int, step_pin: str, dir_pin: str) -> None:
        self.oid = oid
        self.step_pin = step_pin
        self.dir_pin = dir_pin
        self.position = 0  # steps of all folded (completed) moves
        self.moves: collections.deque[Move] = collections.deque()
        # Like the firmware, step times are 32-bit and add up modulo 2**32
        # (the host relies on that, e.g. after `reset_step_clock clock=0`).
        self.last_clock32 = 0
        self.next_sign = -1
        self.need_reset = False
        self.trsync_oid: int | None = None
        self.total_steps = 0

    def fold(self, upto: int) -> None:
        moves = self.moves
        while moves and moves[0].end <= upto:
            m = moves.popleft()
            self.position += m.sign * m.count

    def position_at(self, clock: int) -> int:
        pos = self.position
        for m in self.moves:
            if m.base >= clock:
                break
            pos += m.sign * m.steps_upto(clock)
        return pos

    def stop(self, clock: int) -> None:
        self.position = self.position_at(clock)
        self.moves.clear()
        self.last_clock32 = clock & 0xFFFFFFFF
        self.need_reset = True


class Trsync:
    def __init__(self, oid: int) -> None:
        self.oid = oid
        self.can_trigger = False
        self.trigger_reason = 0
        self.expire_reason = 0
        self.report_ticks = 0
        self.report_timer: Timer | None = None
        self.expire_timer: Timer | None = None
        self.steppers: list[int] = []


class Endstop:
    def __init__(self, oid: int, pin: str, pull_up: int) -> None:
        self.oid = oid
        self.pin = pin
        self.pull_up = pull_up
        self.homing = False
        self.start_clock = 0
        self.rest_ticks = 0
        self.pin_value = 1
        self.trsync_oid = 0
        self.trigger_reason = 0
        self.next_clock = 0
        self.timer: Timer | None = None
        # Where the switch is, learnt at the first trigger:
        # (stepper oid, stepper position, direction that presses it).
        self.switch: tuple[int, int, int] | None = None


class Buttons:
    """Up to 8 input pins reported together as one bitmask (the firmware's
    src/buttons.c): each change of the pins' levels is queued as a report
    and sent in ``buttons_state`` until the host acknowledges it."""

    def __init__(self, oid: int, count: int) -> None:
        self.oid = oid
        self.pins: list[tuple[str, int] | None] = [None] * count
        self.active = False
        self.pressed = 0
        self.reports: list[int] = []
        self.ack_count = 0
        self.retransmit_ticks = 0
        self.timer: Timer | None = None


class SimMCU:
    def __init__(self, pty_path: str, control_path: str,
                 endstop_steps: int = 400, clock_start: float = 0.0) -> None:
        self.pty_path = pty_path
        self.control_path = control_path
        self.endstop_steps = endstop_steps
        # clock 0 is at start_time; clock_start > 0 starts the clock later
        # (e.g. just before its 32-bit wrap at ~214.7 s)
        self.start_time = time.monotonic() - clock_start
        self.heaters = default_heaters()
        self.ambient = 25.0
        # Input pins set from the control socket (a switch's level is a
        # physical fact: it survives MCU resets)
        self.input_levels: dict[str, int] = {}
        self.muted = False
        self.resets = 0
        self._seq = itertools.count()
        self._timers: list[tuple[int, int, Timer]] = []
        self._running = True
        self.counters: collections.Counter[str] = collections.Counter()
        self.txbuf = bytearray()
        self._build_dictionary()
        self.stats_timer = self.add_timer(
            self.clock() + int(STATS_INTERVAL * CLOCK_FREQ), self._stats_event)
        self._reset_state()

    # ------------------------------------------------------------ dictionary
    def _build_dictionary(self) -> None:
        ids = itertools.count(2)
        commands = {}
        responses = {}
        for fmt in COMMANDS:
            commands[fmt] = 1 if fmt.startswith("identify ") else next(ids)
        for fmt in RESPONSES:
            responses[fmt] = (0 if fmt.startswith("identify_response ")
                              else next(ids))
        data = {
            "commands": commands,
            "responses": responses,
            "output": {},
            "config": {
                "MCU": "simmcu",
                "CLOCK_FREQ": CLOCK_FREQ,
                "ADC_MAX": ADC_MAX,
                "PWM_MAX": PWM_MAX,
                "STATS_SUMSQ_BASE": STATS_SUMSQ_BASE,
            },
            "enumerations": {
                "pin": {"gpio0": [0, GPIO_COUNT],
                        "analog0": [GPIO_COUNT, ANALOG_COUNT]},
                "static_string_id": {s: i for i, s in enumerate(STATIC_STRINGS)},
            },
            "app": "Klipper",
            "version": MCU_VERSION,
            "build_versions": "python-simulator",
        }
        raw = json.dumps(data, separators=(",", ":")).encode()
        self.dict_data = zlib.compress(raw, 9)
        self.parser = msgproto.MessageParser()
        self.parser.process_identify(raw, decompress=False)
        self.formats = {mp.name: mp for mp in self.parser.messages_by_name.values()}

    # ----------------------------------------------------------------- clock
    def clock(self) -> int:
        return int((time.monotonic() - self.start_time) * CLOCK_FREQ)

    def clock_to_time(self, clock: int) -> float:
        return clock / CLOCK_FREQ

    def clock64(self, clock32: int) -> int:
        """Extend a 32-bit clock from the host to the nearest 64-bit value."""
        now = self.clock()
        delta = (clock32 - now) & 0xFFFFFFFF
        if delta >= 0x80000000:
            delta -= 0x100000000
        return now + delta

    # ---------------------------------------------------------------- timers
    def add_timer(self, clock: int, func: Callable[[int], None]) -> Timer:
        t = Timer(clock, func)
        heapq.heappush(self._timers, (clock, next(self._seq), t))
        return t

    def _run_timers(self) -> float | None:
        """Run due timers; return seconds until the next one (None: none)."""
        while self._timers:
            clock, _, t = self._timers[0]
            if t.cancelled:
                heapq.heappop(self._timers)
                continue
            now = self.clock()
            if clock > now:
                return (clock - now) / CLOCK_FREQ
            heapq.heappop(self._timers)
            t.cancelled = True
            t.func(clock)
        return None

    # ----------------------------------------------------------------- state
    def _reset_state(self) -> None:
        """Power-on state (also after the reset command)."""
        for _, _, t in self._timers:
            if t is not self.stats_timer:
                t.cancelled = True
        self.next_seq = MESSAGE_DEST
        self.need_sync = False
        self.need_valid = False
        self.oid_count: int | None = None
        self.config_crc = 0
        self.is_config = False
        self.shutdown_reason: str | None = None
        self.shutdown_clock = 0
        self.objects: dict[int, Any] = {}
        self.static_pins: dict[str, float] = {}
        t = self.clock_to_time(self.clock())
        for h in self.heaters:
            h.advance(t)
            h.duty = 0.0
        self.rxbuf = bytearray()

    def _config_reset(self) -> None:
        """config_reset: drop the configuration, keep the link."""
        seq, need_sync, need_valid = self.next_seq, self.need_sync, self.need_valid
        rxbuf = self.rxbuf
        self._reset_state()
        self.next_seq, self.need_sync, self.need_valid = seq, need_sync, need_valid
        self.rxbuf = rxbuf

    def heater(self, name: str) -> ThermalModel:
        name = HEATER_ALIASES.get(name, name)
        for h in self.heaters:
            if h.name == name:
                return h
        raise KeyError("unknown heater %r" % (name,))

    def _set_pin_duty(self, pin: str, duty: float, clock: int) -> None:
        for h in self.heaters:
            if h.pwm_pin == pin:
                h.advance(self.clock_to_time(clock))
                h.duty = duty

    def _adc_fraction(self, pin: str, clock: int) -> float:
        for h in self.heaters:
            if h.adc_pin == pin:
                h.advance(self.clock_to_time(clock))
                return h.adc_fraction()
        return ntc_adc_fraction(self.ambient)

    # -------------------------------------------------------------- shutdown
    def do_shutdown(self, reason: str) -> None:
        if self.shutdown_reason is not None:
            return
        if reason not in STATIC_STRINGS:
            reason = "Command request"
        now = self.clock()
        self.shutdown_reason = reason
        self.shutdown_clock = now
        logging.info("MCU shutdown: %s", reason)
        for obj in self.objects.values():
            if isinstance(obj, Output):
                for t in obj.pending:
                    t.cancelled = True
                obj.pending.clear()
                obj.duty = obj.default
                self._set_pin_duty(obj.pin, obj.default, now)
            elif isinstance(obj, AnalogIn):
                if obj.timer is not None:
                    obj.timer.cancelled = True
                    obj.timer = None
            elif isinstance(obj, Stepper):
                obj.stop(now)
            elif isinstance(obj, Endstop):
                obj.homing = False
                if obj.timer is not None:
                    obj.timer.cancelled = True
                    obj.timer = None
            elif isinstance(obj, Trsync):
                for t in (obj.report_timer, obj.expire_timer):
                    if t is not None:
                        t.cancelled = True
                obj.can_trigger = False
            elif isinstance(obj, Buttons):
                obj.active = False
                if obj.timer is not None:
                    obj.timer.cancelled = True
                    obj.timer = None
        self.send("shutdown", clock=now & 0xFFFFFFFF, static_string_id=reason)

    def _shutdown_exc(self, reason: str) -> McuShutdown:
        self.do_shutdown(reason)
        return McuShutdown(reason)

    def lookup(self, oid: int, cls: type) -> Any:
        obj = self.objects.get(oid)
        if not isinstance(obj, cls):
            raise self._shutdown_exc("Invalid oid type")
        return obj

    def _new_oid(self, oid: int, obj: Any) -> None:
        if self.oid_count is None or oid >= self.oid_count or oid in self.objects:
            raise self._shutdown_exc("Can't assign oid")
        self.objects[oid] = obj

    # ------------------------------------------------------------ transport
    def send(self, name: str, **params: Any) -> None:
        self.send_raw(self.formats[name].encode_by_name(**params))

    def send_raw(self, payload: list[int]) -> None:
        if self.muted:
            return
        frame = [len(payload) + MESSAGE_MIN, self.next_seq] + payload
        frame += msgproto.crc16_ccitt(frame)
        frame.append(MESSAGE_SYNC)
        self.txbuf += bytes(frame)
        self.counters["tx_blocks"] += 1
        self._flush_tx()

    def _flush_tx(self) -> None:
        while self.txbuf:
            try:
                n = os.write(self.master_fd, self.txbuf)
            except BlockingIOError:
                break
            del self.txbuf[:n]
        if len(self.txbuf) > 1 << 18:
            # Nobody reads the port: drop, as a real UART would.
            self.counters["tx_dropped_bytes"] += len(self.txbuf)
            self.txbuf.clear()
        want = selectors.EVENT_READ
        if self.txbuf:
            want |= selectors.EVENT_WRITE
        if want != self._master_events:
            self._master_events = want
            self.sel.modify(self.master_fd, want, self._on_master)

    def _send_ack(self) -> None:
        self.send_raw([])

    def _on_master(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush_tx()
        if mask & selectors.EVENT_READ:
            try:
                data = os.read(self.master_fd, 4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EIO: no reader on the slave side
                return
            if self.muted:
                return
            self.rxbuf += data
            self._process_rx()

    def _process_rx(self) -> None:
        buf = self.rxbuf
        pos = 0
        while pos < len(buf):
            ret, pop = self._find_block(buf, pos)
            if pop == 0:
                break
            block = bytes(buf[pos:pos + pop])
            pos += pop
            if ret > 0:
                self.counters["rx_blocks"] += 1
                if not self._dispatch(block):
                    # reset: the rest of the input is lost with the reboot
                    self.rxbuf = bytearray()
                    return
                self._send_ack()
        del buf[:pos]

    def _find_block(self, buf: bytearray, pos: int) -> tuple[int, int]:
        """Port of the firmware's command_find_block: (ret, bytes to pop)."""
        avail = len(buf) - pos
        if not self.need_sync:
            if avail < MESSAGE_MIN:
                return 0, 0
            msglen = buf[pos]
            seq = buf[pos + 1]
            ok = (MESSAGE_MIN <= msglen <= MESSAGE_MAX
                  and (seq & ~MESSAGE_SEQ_MASK) == MESSAGE_DEST)
            if ok and avail < msglen:
                return 0, 0
            if ok:
                end = pos + msglen
                crc = msgproto.crc16_ccitt(buf[pos:end - MESSAGE_TRAILER_SIZE])
                ok = (buf[end - 1] == MESSAGE_SYNC
                      and list(buf[end - 3:end - 1]) == crc)
            if ok:
                self.need_valid = False
                if seq != self.next_seq:
                    self.counters["naks"] += 1
                    self._send_ack()  # lost block: nak until retransmitted
                    return -1, msglen
                self.next_seq = ((seq + 1) & MESSAGE_SEQ_MASK) | MESSAGE_DEST
                return 1, msglen
            if buf[pos] == MESSAGE_SYNC:
                return -1, 1
            self.need_sync = True
        # Discard until the next sync byte
        idx = buf.find(bytes([MESSAGE_SYNC]), pos)
        if idx >= 0:
            self.need_sync = False
            pop = idx - pos + 1
        else:
            pop = avail
        if not self.need_valid:
            self.need_valid = True
            self.counters["naks"] += 1
            self._send_ack()
        return -1, pop

    def _dispatch(self, block: bytes) -> bool:
        """Run the commands of a block; False if the MCU was reset."""
        pos = 2
        end = len(block) - MESSAGE_TRAILER_SIZE
        while pos < end:
            mp = self.parser.messages_by_id.get(block[pos])
            if mp is None or mp.name not in self._handlers:
                self.do_shutdown("Invalid command")
                return True
            try:
                params, pos = mp.parse(block, pos)
            except (IndexError, msgproto.error):
                self.do_shutdown("Invalid command")
                return True
            name = mp.name
            self.counters["cmd:" + name] += 1
            if self.shutdown_reason is not None and name not in ALLOWED_IN_SHUTDOWN:
                self.send("is_shutdown", static_string_id=self.shutdown_reason)
                continue
            if name == "reset":
                self.resets += 1
                logging.info("reset command: rebooting")
                self._reset_state()
                return False
            try:
                self._handlers[name](self, params)
            except McuShutdown:
                return True
        return True

    # ------------------------------------------------------------- commands
    def cmd_identify(self, p: dict) -> None:
        off = p["offset"]
        self.send("identify_response", offset=off,
                  data=self.dict_data[off:off + p["count"]])

    def cmd_get_uptime(self, p: dict) -> None:
        now = self.clock()
        self.send("uptime", high=now >> 32, clock=now & 0xFFFFFFFF)

    def cmd_get_clock(self, p: dict) -> None:
        self.send("clock", clock=self.clock() & 0xFFFFFFFF)

    def cmd_get_config(self, p: dict) -> None:
        self.send("config", is_config=int(self.is_config), crc=self.config_crc,
                  is_shutdown=int(self.shutdown_reason is not None),
                  move_count=MOVE_COUNT)

    def cmd_allocate_oids(self, p: dict) -> None:
        if self.oid_count is not None:
            raise self._shutdown_exc("oids already allocated")
        self.oid_count = p["count"]

    def cmd_finalize_config(self, p: dict) -> None:
        self.config_crc = p["crc"]
        self.is_config = True
        logging.info("configured: %d oids, crc %d", self.oid_count or 0,
                     self.config_crc)

    def cmd_config_reset(self, p: dict) -> None:
        if self.shutdown_reason is None:
            raise self._shutdown_exc("config_reset only available when shutdown")
        self.resets += 1
        logging.info("config_reset")
        self._config_reset()

    def cmd_emergency_stop(self, p: dict) -> None:
        self.do_shutdown("Command request")

    def cmd_clear_shutdown(self, p: dict) -> None:
        self.shutdown_reason = None

    def cmd_debug_nop(self, p: dict) -> None:
        pass

    # outputs
    def cmd_config_digital_out(self, p: dict) -> None:
        self._new_oid(p["oid"], Output(p["oid"], p["pin"], float(p["value"]),
                                       float(p["default_value"])))
        self._set_pin_duty(p["pin"], float(p["value"]), self.clock())

    def cmd_set_digital_out(self, p: dict) -> None:
        self.static_pins[p["pin"]] = float(p["value"])
        self._set_pin_duty(p["pin"], float(p["value"]), self.clock())

    def cmd_update_digital_out(self, p: dict) -> None:
        out = self.lookup(p["oid"], Output)
        out.duty = float(bool(p["value"]))
        self._set_pin_duty(out.pin, out.duty, self.clock())

    def cmd_set_digital_out_pwm_cycle(self, p: dict) -> None:
        self.lookup(p["oid"], Output).cycle_ticks = p["cycle_ticks"]

    def _queue_output(self, out: Output, clock32: int, duty: float) -> None:
        def apply(clock: int) -> None:
            out.pending.remove(timer)
            out.duty = duty
            self._set_pin_duty(out.pin, duty, clock)
        timer = self.add_timer(self.clock64(clock32), apply)
        out.pending.append(timer)

    def cmd_queue_digital_out(self, p: dict) -> None:
        out = self.lookup(p["oid"], Output)
        on = p["on_ticks"]
        if out.cycle_ticks:
            duty = min(1.0, on / out.cycle_ticks)
        else:
            duty = float(bool(on))
        self._queue_output(out, p["clock"], duty)

    def cmd_config_pwm_out(self, p: dict) -> None:
        out = Output(p["oid"], p["pin"], p["value"] / PWM_MAX,
                     p["default_value"] / PWM_MAX, hw_pwm=True)
        out.cycle_ticks = p["cycle_ticks"]
        self._new_oid(p["oid"], out)
        self._set_pin_duty(out.pin, out.duty, self.clock())

    def cmd_set_pwm_out(self, p: dict) -> None:
        self.static_pins[p["pin"]] = p["value"] / PWM_MAX
        self._set_pin_duty(p["pin"], p["value"] / PWM_MAX, self.clock())

    def cmd_queue_pwm_out(self, p: dict) -> None:
        out = self.lookup(p["oid"], Output)
        self._queue_output(out, p["clock"], min(1.0, p["value"] / PWM_MAX))

    # ADC
    def cmd_config_analog_in(self, p: dict) -> None:
        self._new_oid(p["oid"], AnalogIn(p["oid"], p["pin"]))

    def cmd_query_analog_in(self, p: dict) -> None:
        adc = self.lookup(p["oid"], AnalogIn)
        if adc.timer is not None:
            adc.timer.cancelled = True
            adc.timer = None
        adc.sample_count = p["sample_count"]
        adc.rest_ticks = p["rest_ticks"]
        adc.min_value = p["min_value"]
        adc.max_value = p["max_value"]
        adc.range_check_count = p["range_check_count"]
        adc.invalid_count = 0
        if adc.sample_count and adc.rest_ticks:
            adc.timer = self.add_timer(self.clock64(p["clock"]),
                                       lambda clock: self._adc_event(adc, clock))

    def _adc_event(self, adc: AnalogIn, clock: int) -> None:
        raw = round(self._adc_fraction(adc.pin, clock) * ADC_MAX)
        value = min(0xFFFF, raw * adc.sample_count)
        adc.last_value = value
        next_clock = clock + adc.rest_ticks
        now = self.clock()
        while next_clock <= now:  # the loop was held up: skip missed slots
            next_clock += adc.rest_ticks
        adc.timer = self.add_timer(next_clock,
                                   lambda c: self._adc_event(adc, c))
        if adc.range_check_count and not adc.min_value <= value <= adc.max_value:
            adc.invalid_count += 1
            if adc.invalid_count >= adc.range_check_count:
                self.do_shutdown("ADC out of range")
                return
        else:
            adc.invalid_count = 0
        self.send("analog_in_state", oid=adc.oid,
                  next_clock=(clock + adc.rest_ticks) & 0xFFFFFFFF, value=value)

    # steppers
    def cmd_config_stepper(self, p: dict) -> None:
        self._new_oid(p["oid"], Stepper(p["oid"], p["step_pin"], p["dir_pin"]))

    def cmd_queue_step(self, p: dict) -> None:
        s = self.lookup(p["oid"], Stepper)
        count = p["count"]
        if s.need_reset or not count:
            return
        # Extend the first step's time (always near "now"), not the base,
        # which may be a long way back (e.g. 0 after reset_step_clock clock=0)
        interval = p["interval"]
        base = self.clock64((s.last_clock32 + interval) & 0xFFFFFFFF) - interval
        m = Move(base, interval, count, p["add"], s.next_sign)
        s.moves.append(m)
        s.last_clock32 = m.end & 0xFFFFFFFF
        s.total_steps += count
        if s.trsync_oid is not None:
            for obj in self.objects.values():
                if (isinstance(obj, Endstop) and obj.homing
                        and obj.timer is None and obj.trsync_oid == s.trsync_oid):
                    self._plan_endstop(obj)
        else:
            s.fold(self.clock())

    def cmd_set_next_step_dir(self, p: dict) -> None:
        self.lookup(p["oid"], Stepper).next_sign = 1 if p["dir"] else -1

    def cmd_reset_step_clock(self, p: dict) -> None:
        s = self.lookup(p["oid"], Stepper)
        s.last_clock32 = p["clock"]
        s.need_reset = False

    def cmd_stepper_get_position(self, p: dict) -> None:
        s = self.lookup(p["oid"], Stepper)
        self.send("stepper_position", oid=s.oid, pos=s.position_at(self.clock()))

    def cmd_stepper_stop_on_trigger(self, p: dict) -> None:
        s = self.lookup(p["oid"], Stepper)
        ts = self.lookup(p["trsync_oid"], Trsync)
        if not ts.can_trigger:
            s.stop(self.clock())
            return
        s.trsync_oid = ts.oid
        ts.steppers.append(s.oid)
        for obj in self.objects.values():
            if (isinstance(obj, Endstop) and obj.homing and obj.timer is None
                    and obj.trsync_oid == ts.oid):
                self._plan_endstop(obj)

    # endstops
    def cmd_config_endstop(self, p: dict) -> None:
        self._new_oid(p["oid"], Endstop(p["oid"], p["pin"], p["pull_up"]))

    def cmd_endstop_home(self, p: dict) -> None:
        e = self.lookup(p["oid"], Endstop)
        if e.timer is not None:
            e.timer.cancelled = True
            e.timer = None
        if not p["sample_count"]:
            e.homing = False
            return
        e.homing = True
        e.start_clock = self.clock64(p["clock"])
        e.rest_ticks = p["rest_ticks"]
        e.pin_value = p["pin_value"]
        e.trsync_oid = p["trsync_oid"]
        e.trigger_reason = p["trigger_reason"]
        self._plan_endstop(e)

    def _homing_stepper(self, e: Endstop) -> Stepper | None:
        for obj in sorted(self.objects.values(), key=lambda o: o.oid):
            if isinstance(obj, Stepper) and obj.trsync_oid == e.trsync_oid:
                ts = self.objects.get(e.trsync_oid)
                if isinstance(ts, Trsync) and obj.oid in ts.steppers:
                    return obj
        return None

    def _plan_endstop(self, e: Endstop) -> None:
        """Find when the endstop triggers; schedule it once it is known."""
        s = self._homing_stepper(e)
        if s is None:
            return
        found = self._find_trigger(e, s)
        if found is None:
            return
        clock, sign = found
        e.timer = self.add_timer(
            clock, lambda c: self._endstop_trigger(e, s, c, sign))

    def _find_trigger(self, e: Endstop, s: Stepper) -> tuple[int, int] | None:
        c0 = e.start_clock
        pos = s.position
        if e.switch is not None and e.switch[0] == s.oid:
            _, sw, d = e.switch
            if (s.position_at(c0) - sw) * d >= 0:
                return c0, d  # already pressed when homing starts
            for m in s.moves:
                k0 = m.steps_upto(c0)
                if m.sign == d and k0 < m.count:
                    k = max(k0 + 1, (sw - pos) * d)
                    if k <= m.count:
                        return m.step_time(k), d
                pos += m.sign * m.count
            return None
        need = self.endstop_steps
        for m in s.moves:
            k0 = m.steps_upto(c0)
            avail = m.count - k0
            if avail >= need:
                return m.step_time(k0 + need), m.sign
            need -= avail
        return None

    def _endstop_trigger(self, e: Endstop, s: Stepper, clock: int,
                         sign: int) -> None:
        e.timer = None
        if not e.homing:
            return
        e.homing = False
        e.next_clock = clock + e.rest_ticks
        if e.switch is None or e.switch[0] != s.oid:
            e.switch = (s.oid, s.position_at(clock), sign)
        logging.info("endstop %d triggered at stepper %d pos %d", e.oid, s.oid,
                     s.position_at(clock))
        ts = self.objects.get(e.trsync_oid)
        if isinstance(ts, Trsync):
            self._trsync_trigger(ts, e.trigger_reason, clock)

    def cmd_endstop_query_state(self, p: dict) -> None:
        e = self.lookup(p["oid"], Endstop)
        self.send("endstop_state", oid=e.oid, homing=int(e.homing),
                  next_clock=e.next_clock & 0xFFFFFFFF,
                  pin_value=self._endstop_pin(e))

    def _endstop_pin(self, e: Endstop) -> int:
        pressed = False
        if e.switch is not None:
            s = self.objects.get(e.switch[0])
            if isinstance(s, Stepper):
                pressed = (s.position_at(self.clock()) - e.switch[1]) * e.switch[2] >= 0
        return e.pin_value if pressed else int(not e.pin_value)

    # trsync
    def cmd_config_trsync(self, p: dict) -> None:
        self._new_oid(p["oid"], Trsync(p["oid"]))

    def cmd_trsync_start(self, p: dict) -> None:
        ts = self.lookup(p["oid"], Trsync)
        for t in (ts.report_timer, ts.expire_timer):
            if t is not None:
                t.cancelled = True
        ts.report_timer = ts.expire_timer = None
        for oid in ts.steppers:
            s = self.objects.get(oid)
            if isinstance(s, Stepper):
                s.trsync_oid = None
        ts.can_trigger = True
        ts.trigger_reason = 0
        ts.expire_reason = p["expire_reason"]
        ts.report_ticks = p["report_ticks"]
        ts.steppers = []
        if ts.report_ticks:
            ts.report_timer = self.add_timer(
                self.clock64(p["report_clock"]),
                lambda c: self._trsync_report(ts, c))

    def _trsync_report(self, ts: Trsync, clock: int) -> None:
        if not ts.can_trigger:
            return
        ts.report_timer = self.add_timer(clock + ts.report_ticks,
                                         lambda c: self._trsync_report(ts, c))
        self.send("trsync_state", oid=ts.oid, can_trigger=1, trigger_reason=0,
                  clock=clock & 0xFFFFFFFF)

    def cmd_trsync_set_timeout(self, p: dict) -> None:
        ts = self.lookup(p["oid"], Trsync)
        if ts.expire_timer is not None:
            ts.expire_timer.cancelled = True
        ts.expire_timer = self.add_timer(
            self.clock64(p["clock"]),
            lambda c: self._trsync_trigger(ts, ts.expire_reason, c))

    def cmd_trsync_trigger(self, p: dict) -> None:
        ts = self.lookup(p["oid"], Trsync)
        now = self.clock()
        self._trsync_trigger(ts, p["reason"], now, report=False)
        self.send("trsync_state", oid=ts.oid, can_trigger=int(ts.can_trigger),
                  trigger_reason=ts.trigger_reason, clock=now & 0xFFFFFFFF)

    def _trsync_trigger(self, ts: Trsync, reason: int, clock: int,
                        report: bool = True) -> None:
        if not ts.can_trigger:
            return
        ts.can_trigger = False
        ts.trigger_reason = reason
        for t in (ts.report_timer, ts.expire_timer):
            if t is not None:
                t.cancelled = True
        ts.report_timer = ts.expire_timer = None
        for oid in ts.steppers:
            s = self.objects.get(oid)
            if isinstance(s, Stepper):
                s.stop(clock)
                s.trsync_oid = None
        ts.steppers = []
        if report:
            self.send("trsync_state", oid=ts.oid, can_trigger=0,
                      trigger_reason=reason, clock=clock & 0xFFFFFFFF)

    # buttons (filament switches, gcode_button, display keys)
    def cmd_config_buttons(self, p: dict) -> None:
        if p["button_count"] > 8:
            raise self._shutdown_exc("Invalid command")
        self._new_oid(p["oid"], Buttons(p["oid"], p["button_count"]))

    def cmd_buttons_add(self, p: dict) -> None:
        b = self.lookup(p["oid"], Buttons)
        if p["pos"] >= len(b.pins):
            raise self._shutdown_exc("Invalid command")
        b.pins[p["pos"]] = (p["pin"], p["pull_up"])

    def cmd_buttons_query(self, p: dict) -> None:
        b = self.lookup(p["oid"], Buttons)
        if b.timer is not None:
            b.timer.cancelled = True
            b.timer = None
        b.pressed = p["invert"]
        b.reports = []
        b.ack_count = 0
        b.retransmit_ticks = p["retransmit_count"] * p["rest_ticks"]
        b.active = bool(p["rest_ticks"])
        if b.active:
            b.timer = self.add_timer(self.clock64(p["clock"]),
                                     lambda c: self._buttons_sample(b, c))

    def cmd_buttons_ack(self, p: dict) -> None:
        b = self.lookup(p["oid"], Buttons)
        b.ack_count = (b.ack_count + p["count"]) & 0xFF
        del b.reports[:p["count"]]
        if not b.reports and b.timer is not None:
            b.timer.cancelled = True
            b.timer = None

    def _input_level(self, pin: str, pull_up: int) -> int:
        return self.input_levels.get(pin, 1 if pull_up == 1 else 0)

    def _buttons_sample(self, b: Buttons, clock: int) -> None:
        """Read the pins (at the first query, and when a level changes)."""
        if not b.active:
            return
        status = 0
        for i, pin in enumerate(b.pins):
            if pin is not None and self._input_level(*pin):
                status |= 1 << i
        if status == b.pressed:
            return
        b.pressed = status
        if len(b.reports) < 8:
            b.reports.append(status)
        self._buttons_send(b, clock)

    def _buttons_send(self, b: Buttons, clock: int) -> None:
        if b.timer is not None:
            b.timer.cancelled = True
            b.timer = None
        if not b.reports:
            return
        self.send("buttons_state", oid=b.oid, ack_count=b.ack_count,
                  state=bytes(b.reports))
        if b.retransmit_ticks:
            b.timer = self.add_timer(clock + b.retransmit_ticks,
                                     lambda c: self._buttons_send(b, c))

    def set_input(self, pin: str, value: int) -> None:
        self.input_levels[pin] = 1 if value else 0
        if self.shutdown_reason is not None:
            return
        now = self.clock()
        for obj in list(self.objects.values()):
            if isinstance(obj, Buttons) and any(
                    p is not None and p[0] == pin for p in obj.pins):
                self._buttons_sample(obj, now)

    # stats
    def _stats_event(self, clock: int) -> None:
        self.stats_timer = self.add_timer(
            clock + int(STATS_INTERVAL * CLOCK_FREQ), self._stats_event)
        count = 1000
        ticks = 40
        self.send("stats", count=count, sum=count * ticks,
                  sumsq=count * ticks * ticks // STATS_SUMSQ_BASE)

    _handlers: dict[str, Callable[[SimMCU, dict], None]] = {}

    # -------------------------------------------------------------- control
    def control(self, req: dict) -> dict:
        cmd = req.get("cmd")
        if cmd == "ping":
            return {}
        if cmd == "shutdown":
            reason = req.get("reason", "Timer too close")
            if reason not in STATIC_STRINGS:
                raise ValueError("unknown shutdown reason %r (known: %s)"
                                 % (reason, ", ".join(STATIC_STRINGS)))
            self.do_shutdown(reason)
            return {}
        if cmd == "set_heater":
            h = self.heater(req["heater"])
            h.advance(self.clock_to_time(self.clock()))
            temp = req.get("temp")
            h.pinned = None if temp is None else float(temp)
            if temp is not None:
                h.temp = float(temp)
            return {}
        if cmd == "heater_fault":
            fault = req.get("fault")
            if fault not in (None, "open", "short", "no_power"):
                raise ValueError("unknown fault %r" % (fault,))
            h = self.heater(req["heater"])
            h.advance(self.clock_to_time(self.clock()))
            h.fault = fault
            return {}
        if cmd == "set_ambient":
            self.ambient = float(req["temp"])
            now = self.clock_to_time(self.clock())
            for h in self.heaters:
                h.advance(now)
                h.ambient = self.ambient
            return {}
        if cmd == "set_pin":
            pin = str(req["pin"])
            if pin not in INPUT_PINS:
                raise ValueError("unknown pin %r" % (pin,))
            self.set_input(pin, int(req["value"]))
            return {}
        if cmd == "set_endstop_steps":
            self.endstop_steps = int(req["steps"])
            return {}
        if cmd == "mute":
            self.muted = bool(req.get("on", True))
            return {}
        if cmd == "reset":  # power cycle: unconfigured, not shut down
            self.resets += 1
            self._reset_state()
            return {}
        if cmd == "stats":
            return self.stats()
        raise ValueError("unknown command %r" % (cmd,))

    def stats(self) -> dict:
        now = self.clock()
        t = self.clock_to_time(now)
        heaters = {}
        for h in self.heaters:
            h.advance(t)
            heaters[h.name] = {"temp": round(h.temp, 3), "duty": h.duty,
                               "pinned": h.pinned, "fault": h.fault}
        steppers = {}
        for obj in self.objects.values():
            if isinstance(obj, Stepper):
                steppers[obj.step_pin] = {"oid": obj.oid,
                                          "position": obj.position_at(now),
                                          "total_steps": obj.total_steps}
        return {
            "clock": now,
            "uptime": t,
            "is_config": self.is_config,
            "crc": self.config_crc,
            "oid_count": self.oid_count,
            "is_shutdown": self.shutdown_reason is not None,
            "shutdown_reason": self.shutdown_reason,
            "resets": self.resets,
            "muted": self.muted,
            "heaters": heaters,
            "steppers": steppers,
            "inputs": dict(self.input_levels),
            "counters": dict(self.counters),
        }

    def _on_control_accept(self, mask: int) -> None:
        try:
            conn, _ = self.ctl_sock.accept()
        except OSError:
            return
        conn.setblocking(False)
        self.sel.register(conn, selectors.EVENT_READ,
                          self._make_client_handler(conn))

    def _make_client_handler(self, conn: socket.socket) -> Callable[[int], None]:
        buf = bytearray()

        def handler(mask: int) -> None:
            try:
                data = conn.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self.sel.unregister(conn)
                conn.close()
                return
            buf.extend(data)
            while b"\n" in buf:
                line, _, rest = bytes(buf).partition(b"\n")
                buf[:] = rest
                if not line.strip():
                    continue
                try:
                    req = json.loads(line)
                    resp = {"ok": True, **self.control(req)}
                except Exception as e:  # report any error to the client
                    resp = {"ok": False, "error": "%s: %s" % (type(e).__name__, e)}
                try:
                    conn.setblocking(True)
                    conn.sendall(json.dumps(resp).encode() + b"\n")
                    conn.setblocking(False)
                except OSError:
                    pass
        return handler

    # ------------------------------------------------------------ main loop
    def setup(self) -> None:
        self.master_fd, self.slave_fd = os.openpty()
        tty.setraw(self.slave_fd)  # no echo, no line discipline
        tty.setraw(self.master_fd)
        os.set_blocking(self.master_fd, False)
        slave_name = os.ttyname(self.slave_fd)
        for path in (self.pty_path, self.control_path):
            if os.path.lexists(path):
                os.unlink(path)
        os.symlink(slave_name, self.pty_path)
        self.ctl_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.ctl_sock.bind(self.control_path)
        self.ctl_sock.listen(8)
        self.ctl_sock.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self._master_events = selectors.EVENT_READ
        self.sel.register(self.master_fd, selectors.EVENT_READ, self._on_master)
        self.sel.register(self.ctl_sock, selectors.EVENT_READ,
                          self._on_control_accept)
        logging.info("pty %s -> %s, control %s", self.pty_path, slave_name,
                     self.control_path)

    def run(self) -> None:
        while self._running:
            timeout = self._run_timers()
            for key, mask in self.sel.select(timeout):
                key.data(mask)

    def close(self) -> None:
        for path in (self.pty_path, self.control_path):
            try:
                if os.path.islink(path) or os.path.exists(path):
                    os.unlink(path)
            except OSError:
                pass


SimMCU._handlers = {
    name[4:]: func for name, func in vars(SimMCU).items()
    if name.startswith("cmd_")
}
SimMCU._handlers["reset"] = lambda self, p: None  # handled in _dispatch
assert set(SimMCU._handlers) == {f.split()[0] for f in COMMANDS}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pty", required=True, help="symlink to create for the pty")
    ap.add_argument("--control", required=True, help="control unix socket path")
    ap.add_argument("--endstop-steps", type=int, default=400,
                    help="steps an endstop's stepper moves before the first trigger")
    ap.add_argument("--clock-start", type=float, default=0.0,
                    help="seconds on the MCU clock at start (2**32 ticks = 214.7 s)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s simmcu %(message)s", stream=sys.stderr)

    def on_signal(signum: int, frame: Any) -> None:
        logging.info("exiting on signal %d", signum)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    mcu = SimMCU(args.pty, args.control, endstop_steps=args.endstop_steps,
                 clock_start=args.clock_start)
    try:
        mcu.setup()
        print("READY", flush=True)
        mcu.run()
    finally:
        mcu.close()


if __name__ == "__main__":
    main()
