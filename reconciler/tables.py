"""Tables that fit the terminal without cutting a number or an id.

rich shrinks every column of a table wider than the terminal, cutting `5000` to `5…`.
Here each column says what may give way: `NUMBER` cells never wrap, `WORDS` cells
(ids, keys, times, statuses) may wrap at their spaces but never inside a word, `TEXT`
cells (errors, notes, values) wrap anywhere. The widths are chosen here, not by rich:

1. the whole table, when it fits with every `WORDS` cell on one line and every `TEXT`
   column wide enough for its longest text in `TEXT_LINES` lines (`TEXT_MIN` at least);
2. else the table without its `TEXT` columns, each row's texts on the lines under it;
3. 1 and 2 again with one space between columns instead of two; then again with
   `WORDS` cells wrapped at their spaces;
4. else one block per row, `header value` pairs packed into lines, texts on their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

Kind = Literal["number", "words", "text"]
NUMBER: Final = "number"
WORDS: Final = "words"
TEXT: Final = "text"
Cell = str | Text
TEXT_MIN = 24
TEXT_LINES = 3
INDENT = 2


@dataclass(frozen=True)
class Column:
    header: str
    kind: Kind = WORDS


def _text(cell: Cell) -> Text:
    # Plain strings are data (user ids, errors), never rich markup.
    return cell.copy() if isinstance(cell, Text) else Text(cell)


def _longest_word(text: Text) -> int:
    return max((len(word) for word in text.plain.split()), default=0)


def _natural(column: Column, cells: list[Text]) -> int:
    return max([len(column.header), *(t.cell_len for t in cells)])


def _minimum(column: Column, cells: list[Text], whole_words: bool = False) -> int:
    if column.kind == NUMBER or (column.kind == WORDS and whole_words):
        return _natural(column, cells)
    if column.kind == WORDS:
        return max([_longest_word(Text(column.header)), *(_longest_word(t) for t in cells), 1])
    return min(_natural(column, cells), TEXT_MIN)


def _widths(
    columns: Sequence[Column], body: list[list[Text]], room: int, whole_words: bool
) -> list[int]:
    """Each column's content width: its minimum, then spare room to the `WORDS` columns
    up to their natural width (one line a cell; the nearest to it first, so that as many
    columns as possible get there), then shared among the `TEXT` columns."""
    cells = [[row[i] for row in body] for i in range(len(columns))]
    natural = [_natural(c, cells[i]) for i, c in enumerate(columns)]
    widths = [_minimum(c, cells[i], whole_words) for i, c in enumerate(columns)]
    spare = room - sum(widths)
    words = [i for i, c in enumerate(columns) if c.kind == WORDS]
    for i in sorted(words, key=lambda i: natural[i] - widths[i]):
        add = max(0, min(natural[i] - widths[i], spare))
        widths[i] += add
        spare -= add
    texts = [i for i, c in enumerate(columns) if c.kind == TEXT]
    while spare > 0:
        short = [i for i in texts if widths[i] < natural[i]]
        if not short:
            break
        step = max(1, spare // len(short))
        for i in short:
            add = min(step, natural[i] - widths[i], spare)
            widths[i] += add
            spare -= add
    return widths


def _table(
    title: str | Text | None,
    columns: Sequence[Column],
    widths: list[int],
    rows: list[list[Text]],
    gap: int,
    show_header: bool = True,
) -> Table:
    # SIMPLE_HEAD: a rule under the header, a one-space column separator
    table = Table(
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=(0, gap - 1, 0, 0),
        pad_edge=False,
        header_style="bold",
        show_header=show_header,
    )
    for column, width in zip(columns, widths, strict=True):
        table.add_column(
            column.header,
            width=width,
            no_wrap=column.kind == NUMBER,
            justify="right" if column.kind == NUMBER else "left",
            overflow="fold",
        )
    for row in rows:
        table.add_row(*row)
    return table


def _width(out: Console, table: Table) -> int:
    """The table's full width (rich's measurement, unclamped by the console's)."""
    return Measurement.get(out, out.options.update_width(1 << 20), table).maximum


def _fit(
    out: Console, columns: Sequence[Column], body: list[list[Text]], whole_words: bool, gap: int
) -> list[int] | None:
    """The column widths at this console's width, or None when the minimums do not fit
    (with `whole_words`, a `WORDS` column's minimum is its longest cell)."""
    probe = _table(None, columns, [1] * len(columns), body, gap)
    overhead = _width(out, probe) - len(columns)
    widths = _widths(columns, body, out.width - overhead, whole_words)
    fits = _width(out, _table(None, columns, widths, body, gap)) <= out.width
    # A text squeezed into more than TEXT_LINES lines reads better under its row.
    squeezed = any(
        row[i].cell_len > TEXT_LINES * width
        for row in body
        for i, (c, width) in enumerate(zip(columns, widths, strict=True))
        if c.kind == TEXT
    )
    return widths if fits and not squeezed else None


def print_table(
    out: Console,
    columns: Sequence[Column],
    rows: Sequence[Sequence[Cell]],
    title: str | Text | None = None,
) -> None:
    """Print `rows` under `columns` in the first layout (see the module) that fits."""
    if title is not None:
        # On a line of its own: rich would wrap a title to the width of a narrow table.
        out.print(title, style="italic", overflow="fold", highlight=False)
        title = None
    body = [[_text(cell) for cell in row] for row in rows]
    texts = [i for i, c in enumerate(columns) if c.kind == TEXT]
    keep = [i for i, c in enumerate(columns) if c.kind != TEXT]
    kept = [columns[i] for i in keep]
    kept_body = [[row[i] for i in keep] for row in body]
    for whole_words, gap in ((True, 2), (True, 1), (False, 1)):
        widths = _fit(out, columns, body, whole_words, gap)
        if widths is not None:
            out.print(_table(title, columns, widths, body, gap))
            return
        widths = _fit(out, kept, kept_body, whole_words, gap) if texts else None
        if widths is not None:
            _print_texts_under(out, title, columns, body, kept, widths, gap)
            return
    _print_blocks(out, title, columns, body)


def _print_texts_under(
    out: Console,
    title: str | Text | None,
    columns: Sequence[Column],
    body: list[list[Text]],
    kept: list[Column],
    widths: list[int],
    gap: int,
) -> None:
    """The table without its `TEXT` columns, each row's texts on the lines under it."""
    out.print(_table(title, kept, widths, [], gap))
    indent = Text(" " * min(widths[0] + gap, 4 * INDENT))  # under the second column
    for row in body:
        cells = [c for c, k in zip(row, columns, strict=True) if k.kind != TEXT]
        out.print(_table(None, kept, widths, [cells], gap, show_header=False))
        for cell, column in zip(row, columns, strict=True):
            if column.kind == TEXT and cell.plain:
                _print_text(out, indent, column, cell)


def _print_text(out: Console, label: Text, column: Column, cell: Text) -> None:
    """`label header: text`, the text wrapped in a hanging indent under itself."""
    prefix = Text.assemble(label, (f"{column.header}: ", "bold"))
    room = out.width - prefix.cell_len
    if room < TEXT_MIN:
        prefix.append("\n" + " " * INDENT * 2)
        room = out.width - INDENT * 2
    lines = cell.wrap(out, room, overflow="fold")
    for n, line in enumerate(lines):
        out.print(
            Text.assemble(prefix if n == 0 else " " * (out.width - room), line),
            overflow="fold",
            crop=False,
        )


def _print_blocks(
    out: Console, title: str | Text | None, columns: Sequence[Column], body: list[list[Text]]
) -> None:
    """One block a row: its `header value` pairs packed into lines (short texts too),
    then its long texts; a blank line between blocks unless each is one line."""
    if title:
        out.print(title)
    blocks = [_block(out, columns, row) for row in body]
    spaced = any(len(lines) > 1 or long for lines, long in blocks)
    for number, ((lines, long), row) in enumerate(zip(blocks, body, strict=True)):
        if number and spaced:
            out.print()
        for n, line in enumerate(lines):
            out.print(Text(" " * INDENT if n else "") + line, overflow="fold")
        for i in long:
            _print_text(out, Text(" " * INDENT), columns[i], row[i])


def _block(
    out: Console, columns: Sequence[Column], row: list[Text]
) -> tuple[list[Text], list[int]]:
    """A row's packed lines, and which of its cells are texts too long to pack."""
    lines: list[Text] = []
    long = [i for i, c in enumerate(columns) if c.kind == TEXT and _is_long(row[i])]
    for i, column in enumerate(columns):
        if i in long or not row[i].plain:
            continue
        pair = Text.assemble((column.header, "bold"), " ", row[i])
        room = out.width - (INDENT if len(lines) > 1 else 0)
        if lines and lines[-1].cell_len + 2 + pair.cell_len <= room:
            lines[-1].append("  ")
            lines[-1].append_text(pair)
        else:
            lines.append(pair)
    return lines, long


def _is_long(cell: Text) -> bool:
    return cell.cell_len > TEXT_MIN or "\n" in cell.plain
