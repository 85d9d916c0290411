"""Plain-text tables that read well in a log and render as markdown pipe tables."""
from __future__ import annotations

from typing import Sequence


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A pipe table with columns padded to their widest cell.

    Args:
        header: the column titles.
        rows: the cells, already formatted as strings, one sequence per row of ``len(header)`` cells.

    Returns:
        The table as lines joined by ``\\n`` (no trailing newline): header, ``|---|`` rule, rows.
        Text columns are left-aligned; a column whose cells all look numeric (or ``-``) is right-aligned.
    """
    for index, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"row {index} has {len(row)} cells, the header has {len(header)}")
    columns = list(zip(header, *rows)) if rows else [(title,) for title in header]
    widths = [max(len(cell) for cell in column) for column in columns]
    numeric = [bool(rows) and all(_looks_numeric(cell) for cell in column[1:]) for column in columns]

    def line(cells: Sequence[str]) -> str:
        padded = [cell.rjust(w) if right else cell.ljust(w) for cell, w, right in zip(cells, widths, numeric)]
        return "| " + " | ".join(padded) + " |"

    # The alignment colon makes markdown renderers right-align the numeric columns as well.
    rule = "|" + "|".join("-" * (w + 1) + ":" if right else "-" * (w + 2) for w, right in zip(widths, numeric)) + "|"
    return "\n".join([line(header), rule] + [line(row) for row in rows])


def _looks_numeric(cell: str) -> bool:
    if cell in ("-", ""):
        return True
    try:
        float(cell)
    except ValueError:
        return False
    return True
