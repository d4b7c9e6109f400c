"""What commands print: tables that fit the terminal, or JSON, CSV and Markdown.

A command builds its output once, as :class:`Sheet` s (a title, columns and
rows of raw values) and lines of text, and :func:`render` writes it in the
format asked for (``--format``):

* ``table``: rich tables that fit the width at hand. A plan name or a number
  is never cut or wrapped: each such column is at least as wide as its
  longest cell, and columns that do not fit move to a second table (keyed by
  the first column) in the order of their ``priority`` (0: always in the
  first). Only prose columns (``wrap``) wrap.
* ``json``: one document: a sheet's rows as a list of objects (raw values,
  every column and every extra key of a row); several sheets or text lines
  make an object, sheets by name, text under ``notes``.
* ``csv``: each sheet's rows with raw values; several sheets are separated
  by a blank line, each under a ``# name`` line.
* ``markdown``: each sheet as a GitHub table of the human texts, every
  column, then the text lines.

Numbers are written for people in the table and Markdown formats (thousands
separators, ms, GB); the machine formats keep them raw. Nothing here imports
torch: listing commands start fast.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

FORMATS = ("table", "json", "csv", "markdown")

# Piped output (logs, CI) gets a wide table instead of rich's 80-column default.
PIPE_WIDTH = 160


def term_width() -> int:
    """The width tables are fitted to: the terminal's (or ``COLUMNS``), else PIPE_WIDTH."""
    if os.environ.get("COLUMNS", "").isdigit():
        return int(os.environ["COLUMNS"])
    if sys.stdout.isatty():
        return os.get_terminal_size(sys.stdout.fileno()).columns
    return PIPE_WIDTH


# -- human units ---------------------------------------------------------------------

def num(v: float | None, sig: int = 3) -> str:
    """A number to ``sig`` significant digits without an exponent between
    1e-3 and 1e15 (thousands separated from 1,000), ``-`` for None."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if v == 0:
        return "0"
    a = abs(v)
    if a < 1e-3:
        return f"{v:.{sig - 1}e}"
    if a >= 10 ** (sig - 1):
        return f"{v:,.0f}"
    digits = sig - 1 - math.floor(math.log10(a))
    return f"{v:.{digits}f}"


def count(v: float | None) -> str:
    """An integer figure (tokens/s) with thousands separators."""
    return "-" if v is None else f"{v:,.0f}"


def nbytes(n: float | None) -> str:
    """Bytes in decimal units to 3 significant digits: ``28.5 GB``, ``101 MB``."""
    if n is None:
        return "-"
    n = float(n)
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{num(n / scale)} {unit}"
    return f"{n:.0f} B"


def err(v: float | None) -> str:
    """A relative error: always scientific, two digits."""
    return "-" if v is None else f"{v:.1e}"


def pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """``1 rank``, ``2 ranks``."""
    return f"{n} {noun if n == 1 else (nouns or noun + 's')}"


# -- sheets ----------------------------------------------------------------------------

@dataclass
class Col:
    """A column: ``key`` names the raw value in a row (and in JSON/CSV);
    ``fmt`` writes it for people; ``priority`` orders which columns stay in
    the first table when the width runs out (0: always); ``wrap``: prose
    that may wrap; ``style(row)``: a rich style for the cell, or None."""

    header: str
    key: str
    fmt: Callable[[Any], str] = lambda v: "-" if v is None else str(v)
    priority: int = 0
    wrap: bool = False
    left: bool = False
    style: Callable[[dict], str | None] | None = None
    # The human text from the whole row (a value whose unit varies by row).
    row_text: Callable[[dict], str] | None = None

    def text(self, row: dict) -> str:
        return self.row_text(row) if self.row_text else self.fmt(row.get(self.key))


@dataclass
class Sheet:
    name: str  # JSON key and CSV section
    title: str
    cols: list[Col]
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # lines under the table


Part = "Sheet | str"


def render(parts: Iterable, fmt: str = "table", width: int | None = None,
           color: bool = False) -> str:
    """``parts`` (sheets and lines of text) in format ``fmt``."""
    parts = list(parts)
    if fmt == "json":
        return _json(parts)
    if fmt == "csv":
        return _csv(parts)
    if fmt == "markdown":
        return _markdown(parts)
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}")
    out = io.StringIO()
    emit(parts, "table", width=width or term_width(), file=out, color=color)
    return out.getvalue()


def emit(parts: Iterable, fmt: str = "table", width: int | None = None, file=None,
         color: bool | None = None) -> None:
    """Print ``parts`` in format ``fmt`` (tables in colour on a terminal)."""
    parts = list(parts)
    file = file or sys.stdout
    if fmt != "table":
        file.write(render(parts, fmt))
        file.flush()
        return
    from rich.console import Console

    width = width or term_width()
    console = Console(file=file, width=width, force_terminal=color, no_color=color is False,
                      highlight=False, soft_wrap=False)
    for part in parts:
        if isinstance(part, Sheet):
            for table in _tables(part, width):
                console.print(table)
            for note in part.notes:
                console.print(note, markup=False)
        else:
            console.print(part, markup=False)


# rich's default box: one space of padding each side and a rule between columns.
def table_width(widths: list[int]) -> int:
    return sum(widths) + 3 * len(widths) + 1


# A prose column gets at least this many characters before it moves to a table of its own.
WRAP_MIN = 24


def _widths(sheet: Sheet, texts: list[list[str]]) -> tuple[list[int], list[int]]:
    """(least, natural) width of each column: an atomic column's least is its
    longest cell (and its header's longest word); a prose column's least is
    WRAP_MIN (or its longest cell, if shorter)."""
    least, natural = [], []
    for i, c in enumerate(sheet.cols):
        cells = [len(t[i]) for t in texts]
        longest = max(cells, default=0)
        word = max((len(w) for w in c.header.split()), default=0)
        if c.wrap:
            least.append(max(word, min(longest, WRAP_MIN)))
        else:
            least.append(max(longest, word))
        natural.append(max(longest, len(c.header)))
    return least, natural


def split_columns(sheet: Sheet, width: int) -> list[list[int]]:
    """The column indices of each table: the first holds every priority-0
    column and then, by priority, every other one that fits; the rest go to
    further tables keyed by the first column."""
    texts = [[c.text(r) for c in sheet.cols] for r in sheet.rows]
    least, _ = _widths(sheet, texts)
    order = sorted(range(len(sheet.cols)), key=lambda i: (sheet.cols[i].priority, i))
    fits = lambda idx: table_width([least[j] for j in idx]) <= width  # noqa: E731
    first = [i for i in order if sheet.cols[i].priority == 0 or i == 0]
    rest = []
    for i in order:
        if i not in first:
            (first if fits(first + [i]) else rest).append(i)
    tables = [sorted(first)]
    while rest:
        table, left = [0], []
        for i in rest:  # each further table takes at least one column
            (table if len(table) == 1 or fits(table + [i]) else left).append(i)
        tables.append(table)
        rest = left
    return tables


def _tables(sheet: Sheet, width: int):
    from rich.table import Table

    texts = [[c.text(r) for c in sheet.cols] for r in sheet.rows]
    least, natural = _widths(sheet, texts)
    groups = split_columns(sheet, width)
    for n, idx in enumerate(groups):
        widths = [least[i] for i in idx]
        # Room to spare widens headers first (one line each), then prose columns.
        spare = width - table_width(widths)
        for k, i in enumerate(idx):
            grow = min(spare, max(0, natural[i] - widths[k])) if not sheet.cols[i].wrap else 0
            widths[k] += grow
            spare -= grow
        for k, i in enumerate(idx):
            if sheet.cols[i].wrap:
                grow = min(spare, max(0, natural[i] - widths[k]))
                widths[k] += grow
                spare -= grow
        title = sheet.title if n == 0 else f"{sheet.title} (continued)" if sheet.title else None
        # Fixed widths: rich wraps a header that is longer than its column's
        # cells, and never narrows a column below its longest cell.
        t = Table(title=title or None, title_justify="left")
        for k, i in enumerate(idx):
            c = sheet.cols[i]
            t.add_column(c.header, width=widths[k], justify="left" if c.left or c.wrap or i == 0
                         else "right", overflow="fold")
        for row, cells in zip(sheet.rows, texts):
            if n and not any(cells[i].strip() for i in idx[1:]):
                continue  # a further table leaves out the rows it has nothing for
            out = []
            for i in idx:
                style = sheet.cols[i].style(row) if sheet.cols[i].style else None
                out.append(_text(cells[i], style))
            t.add_row(*out)
        yield t


def _text(s: str, style: str | None):
    from rich.text import Text

    return Text(s, style=style or "")


# -- machine formats ------------------------------------------------------------------------

def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    return v


def _rows(sheet: Sheet) -> list[dict]:
    keys = [c.key for c in sheet.cols]
    out = []
    for r in sheet.rows:
        d = {k: _clean(r.get(k)) for k in keys}
        d.update({k: _clean(v) for k, v in r.items() if k not in d and not k.startswith("_")})
        out.append(d)
    return out


def _json(parts: list) -> str:
    sheets = [p for p in parts if isinstance(p, Sheet)]
    notes = [p for p in parts if not isinstance(p, Sheet)]
    notes += [n for s in sheets for n in s.notes]
    if len(sheets) == 1 and not notes:
        doc: Any = _rows(sheets[0])
    else:
        doc = {s.name: _rows(s) for s in sheets}
        if notes:
            doc["notes"] = notes
    return json.dumps(doc, indent=2) + "\n"


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        return ";".join(_cell(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return str(v)


def _csv(parts: list) -> str:
    sheets = [p for p in parts if isinstance(p, Sheet)]
    out = io.StringIO()
    for n, s in enumerate(sheets):
        if len(sheets) > 1:
            out.write(("\n" if n else "") + f"# {s.name}\n")
        w = csv.writer(out, lineterminator="\n")
        w.writerow([c.key for c in s.cols])
        for r in s.rows:
            w.writerow([_cell(r.get(c.key)) for c in s.cols])
    return out.getvalue()


def _md(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _markdown(parts: list) -> str:
    out = []
    for p in parts:
        if isinstance(p, Sheet):
            if p.title:
                out.append(f"**{_md(p.title)}**\n")
            out.append("| " + " | ".join(_md(c.header) for c in p.cols) + " |")
            out.append("| " + " | ".join("---" if c.left or c.wrap or i == 0 else "---:"
                                         for i, c in enumerate(p.cols)) + " |")
            for r in p.rows:
                out.append("| " + " | ".join(_md(c.text(r)) for c in p.cols) + " |")
            out.append("")
            out += [f"{n}\n" for n in p.notes]
        else:
            out.append(f"{p}\n")
    return "\n".join(out).rstrip("\n") + "\n"
