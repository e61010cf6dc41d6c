# G-code files: is a download one Klipper can print, and the slicer's
# estimate of its print time
#
# The sniffer judges a download as it streams in, before it is saved;
# the estimate is read from a file's first and last few KB.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import os
import re
import shlex
from typing import Optional

from . import protocol

# What Klipper runs from a file (klippy/gcode.py): a letter and a number
# ("G1", "m104", "M862.3"), or an extended command, case-insensitive, that
# may start with '_' and takes KEY=value arguments ("print_start BED=60",
# "_HEAT_SOAK").  Both may follow a line number; ';' starts a comment.
TRADITIONAL_RE = re.compile(
    rb"(?:[Nn]\d+\s*)?[A-Za-z]\s*[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
    rb"(?:[\s*;A-Za-z]|$)")
EXTENDED_RE = re.compile(
    rb"(?:[Nn]\d+\s*)?[A-Za-z_][A-Za-z0-9_]{1,127}(?:\s+(?P<args>[^#*;]*))?"
    rb"(?:[#*;].*)?")
UTF8_BOM = b"\xef\xbb\xbf"
# Bytes never found in a G-code text file (tab, CR, FF, VT and DOS's ^Z
# end-of-file mark are)
CONTROL_RE = re.compile(rb"[\x00-\x08\x0e-\x19\x1b-\x1f\x7f]")
# The first line that is neither blank nor a comment
COMMAND_LINE_RE = re.compile(rb"^[ \t\r\f\v]*[^;\s]", re.M)
# Wrong downloads, by their first bytes (after a BOM and blank space)
NOT_GCODE_MAGIC = [
    (b"PK\x03\x04", "a ZIP or 3MF archive"),
    (b"GCDE", "binary G-code (.bgcode): export plain-text G-code for"
              " Klipper"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\x7fELF", "a program"),
    (b"%PDF", "a PDF document"),
    (b"\x89PNG", "an image"),
    (b"\xff\xd8\xff", "an image"),
    (b"<", "an HTML or XML page"),
    (b"{", "JSON"),
    (b"[", "JSON"),
]
SNIFF_LINES = 20            # command lines judged
SNIFF_MAX_LINE = 64 * 1024  # a longer line without a newline is junk


def gcode_command_line(line: bytes) -> bool:
    """Would Klipper run this line (not a comment, not blank) as a
    command?  Mirrors klippy/gcode.py's parsing."""
    line = line.strip()
    if CONTROL_RE.search(line):
        return False
    if TRADITIONAL_RE.match(line):
        return True
    match = EXTENDED_RE.fullmatch(line)
    if match is None:
        return False
    args = (match.group("args") or b"").strip()
    if not args:
        return True
    try:
        words = shlex.split(args.decode("utf-8", "replace"))
    except ValueError:
        return False
    return all("=" in w and not w.startswith("=") for w in words)


class GcodeSniffer:
    """Tell early whether a download is a G-code file Klipper can print.

    Fed the file in pieces; judges the first bytes (archives, binary
    G-code, web pages, JSON) and then the first few command lines, however
    many comment lines come before them (thumbnails are thousands).
    feed() returns "" while undecided or fine and an error text once the
    file is refused; finish() at the end of the file gives the verdict."""

    def __init__(self) -> None:
        self.buf = b""
        self.head_checked = False
        self.in_long_comment = False
        self.commands = 0
        self.any_text = False
        self.verdict: Optional[str] = None
    @property
    def decided(self) -> bool:
        return self.verdict is not None
    def feed(self, data: bytes) -> str:
        if self.verdict is not None:
            return self.verdict
        if self.head_checked and b"\0" in data:
            return self._decide("not a G-code file (binary data)")
        if self.in_long_comment:
            nl = data.find(b"\n")
            if nl < 0:
                return ""
            self.in_long_comment = False
            data = data[nl + 1:]
        self.buf += data
        if not self.head_checked:
            view = self.buf[3:] if self.buf.startswith(UTF8_BOM) \
                else self.buf
            if len(view.lstrip()) < 8 and len(self.buf) < 4096:
                return ""           # too little to judge yet
            if self._check_head():
                return self.verdict or ""
        return self._scan(final=False)
    def finish(self) -> str:
        if self.verdict is None and not self.head_checked:
            self._check_head()
        if self.verdict is None:
            self._scan(final=True)
        if self.verdict is None:
            self._decide("" if self.commands else
                         "not a G-code file (only comments)"
                         if self.any_text else "the file is empty")
        return self.verdict or ""
    def _decide(self, verdict: str) -> str:
        self.verdict = verdict
        self.buf = b""
        return verdict
    def _check_head(self) -> bool:
        self.head_checked = True
        if self.buf.startswith(UTF8_BOM):
            self.buf = self.buf[len(UTF8_BOM):]
        head = self.buf.lstrip()
        for magic, what in NOT_GCODE_MAGIC:
            if head.startswith(magic):
                self._decide("not a G-code file (%s)" % (what,))
                return True
        if b"\0" in self.buf:
            self._decide("not a G-code file (binary data)")
            return True
        return False
    def _scan(self, final: bool) -> str:
        buf = self.buf
        end = len(buf) if final else buf.rfind(b"\n") + 1
        if not self.any_text and buf[:end].strip():
            self.any_text = True
        pos = 0
        while pos < end:
            match = COMMAND_LINE_RE.search(buf, pos, end)
            if match is None:
                break
            nl = buf.find(b"\n", match.start(), end)
            stop = end if nl < 0 else nl
            line = buf[match.start():stop]
            pos = stop + 1
            if line.strip() == b"%":        # a tape mark: Klipper skips it
                continue
            if not gcode_command_line(line):
                return self._decide("not a G-code file")
            self.commands += 1
            if self.commands >= SNIFF_LINES:
                return self._decide("")
        self.buf = buf[end:]
        if len(self.buf) > SNIFF_MAX_LINE:
            # One endless line: a comment (skipped to its end) or junk
            if not self.buf.lstrip().startswith(b";"):
                return self._decide("not a G-code file")
            self.buf = b""
            self.any_text = self.in_long_comment = True
        return ""


def sniff_gcode(data: bytes) -> str:
    """Return an error when data (a whole file) is not G-code."""
    sniffer = GcodeSniffer()
    return sniffer.feed(data) or sniffer.finish()


ESTIMATE_PATTERNS = [
    re.compile(r"^;TIME:(\d+(?:\.\d+)?)", re.M),                      # Cura
    re.compile(r"^; estimated printing time(?: \(normal mode\))? = (.+)$",
               re.M),                                   # Prusa/SuperSlicer
    re.compile(r"^; total estimated time: ([^;\n]+)", re.M),        # Orca
    re.compile(r"^;\s*Build time: (.+)$", re.M),                # Simplify3D
]


def _duration(text: str) -> float:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    total = 0.
    units = {"d": 86400., "day": 86400., "days": 86400., "h": 3600.,
             "hour": 3600., "hours": 3600., "m": 60., "minute": 60.,
             "minutes": 60., "s": 1., "second": 1., "seconds": 1.}
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", text):
        total += float(number) * units.get(unit, 0.)
    return total


# A word of each pattern's line: str.find skips to the candidates (a
# regular expression over 128 kB without a hit is 4 ms of CPU holding the
# GIL, on klippy's process, at each print's start)
ESTIMATE_MARKERS = [";TIME:", "estimated printing time",
                    "total estimated time: ", "Build time: "]


def _lines_with(text: str, marker: str):
    at = text.find(marker)
    while at >= 0:
        end = text.find("\n", at)
        end = len(text) if end < 0 else end
        yield text[text.rfind("\n", 0, at) + 1:end]
        at = text.find(marker, end)


def parse_slicer_estimate(text: str) -> float:
    """The slicer's estimate in seconds; 0 when absent or implausible."""
    for marker, pattern in zip(ESTIMATE_MARKERS, ESTIMATE_PATTERNS):
        for line in _lines_with(text, marker):
            match = pattern.search(line)
            if match:
                seconds = _duration(match.group(1))
                return seconds if protocol.usable_estimate(seconds) else 0.
    return 0.


def read_slicer_estimate(path: str) -> float:
    """Slicers write the estimate in the first or last few KB."""
    try:
        with open(path, "rb") as f:
            head = f.read(64 * 1024)
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            tail = f.read()
    except OSError:
        return 0.
    text = (head + b"\n" + tail).decode("utf-8", "replace")
    return parse_slicer_estimate(text)
