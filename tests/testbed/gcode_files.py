"""G-code files for the test printer (see printer_cfg.py)."""

from __future__ import annotations

ROW_SEGMENTS = 40  # 2 mm segments per 80 mm row
SEGMENT_MM = 2.0


def demo_print(moves: int = 300, hotend: float = 200, bed: float = 50,
               extrude_per_move: float = 0.08, feedrate: float = 6000,
               home: bool = True) -> str:
    """Home, heat, then `moves` short extrusion moves in a serpentine.

    Total extrusion is moves * extrude_per_move mm (relative E, M83).
    """
    lines = ["; polar_cloud test bed demo print, %d moves" % (moves,)]
    if home:
        lines.append("G28")
    if bed:
        lines.append("M190 S%g" % (bed,))
    if hotend:
        lines.append("M109 S%g" % (hotend,))
    lines += ["G90", "M83", "G1 Z0.3 F3000", "G1 X20 Y20 F12000"]
    for i in range(moves):
        row, col = divmod(i, ROW_SEGMENTS)
        step = (col + 1) * SEGMENT_MM
        x = 20.0 + step if row % 2 == 0 else 20.0 + ROW_SEGMENTS * SEGMENT_MM - step
        y = 20.0 + row * 0.5
        lines.append("G1 X%.3f Y%.3f E%.4f F%g" % (x, y, extrude_per_move, feedrate))
    lines += ["G1 Z10 F3000", "M104 S0", "M140 S0", "; end of demo print", ""]
    return "\n".join(lines)


# 309 digits: more than a float holds, float() makes inf of it
BEYOND_FLOAT = "9" * 309


def overflowing_numbers_print(moves: int = 300) -> str:
    """A demo print whose numbers overflow a float, all accepted by Klipper:
    a Cura-style time estimate and a G92 E of 309 digits, and extrusion at
    a tiny extrude factor, which print_stats divides by: its filament_used
    turns infinite for the rest of the print.  Both are reset at the end."""
    # 1e-320 %, written without an exponent (the parser splits at the 'E')
    tiny_factor = "0." + "0" * 319 + "1"
    head = [";TIME:" + BEYOND_FLOAT, "M83", "G92 E" + BEYOND_FLOAT,
            "M221 S" + tiny_factor] + ["G1 E%s F600" % ("9" * 308,)] * 3
    return "\n".join(head) + "\n" + demo_print(
        moves=moves, hotend=0, bed=0, feedrate=3000) + "M221 S100\nG92 E0\n"
