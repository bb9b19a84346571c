"""The one table renderer of the bench/ scripts: markdown for the reports they write, or plain
text padded to the columns' widths for a terminal (bench/pretrain.py's results).

Standard library only, unlike bench/common.py: gpu_check.py's summary renders its tables with
it and must run even where torch does not import.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence


def table(header: Sequence[object], rows: Iterable[Sequence[object]], align: str = "", plain: bool = False) -> str:
    """``rows`` under ``header``, every cell written with ``str``.

    ``align`` has one letter per column, ``l`` or ``r`` (columns past its end: ``l``); a
    markdown table states it in the rule under the header (``---`` or ``---:``), a ``plain``
    one pads its cells by it, separates them with `` | `` and rules the header with ``-+-``.
    """
    header = [str(cell) for cell in header]
    rows = [[str(cell) for cell in row] for row in rows]
    align = align.ljust(len(header), "l")
    if plain:
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

        def line(cells: list[str]) -> str:
            return " | ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(cells, widths, align))

        return "\n".join([line(header), "-+-".join("-" * w for w in widths), *map(line, rows)])
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return "\n".join([markdown_row(header), rule, *map(markdown_row, rows)])


def markdown_row(cells: Iterable[object]) -> str:
    """One row of a markdown table: for a script that prints each row as soon as it is measured,
    under the header that ``table(header, [])`` gives."""
    return "| " + " | ".join(str(cell) for cell in cells) + " |"
