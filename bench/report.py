"""The bench's table: each figure with the module, without it, the
difference, its target and PASS/MISS (or "info" for context lines)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Row:
    group: str
    figure: str
    polar: str = ""         # with [polar_cloud]
    base: str = ""          # the same klippy without it
    added: str = ""
    target: str = ""
    ok: bool | None = None  # None: context, no target

    @property
    def verdict(self) -> str:
        if self.ok is None:
            return "info"
        return "PASS" if self.ok else "MISS"


HEADERS = ("figure", "with module", "without", "added", "target", "result")


def table(rows: list[Row]) -> str:
    """A GitHub-flavoured Markdown table (readable as plain text too)."""
    cells = [HEADERS] + [
        ("%s: %s" % (r.group, r.figure), r.polar, r.base, r.added, r.target,
         r.verdict) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADERS))]

    def line(c):
        return "| " + " | ".join(v.ljust(w) for v, w in zip(c, widths)) + " |"
    out = [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(c) for c in cells[1:]]
    return "\n".join(out)


def ms(value: float) -> str:
    return "%.2f ms" % (value,)


def mb(kb: float) -> str:
    return "%.1f MB" % (kb / 1024.,)


def secs(value: float) -> str:
    return "%.3f s" % (value,) if value < 10 else "%.1f s" % (value,)


def pct(value: float) -> str:
    return "%.2f %%" % (value,)
