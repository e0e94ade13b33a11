"""Fitting a table of cells to the terminal: measured as rich draws it, narrowed by taking out
what is least needed first, never by cutting a number short."""
from __future__ import annotations

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table


def table_width(columns: list[tuple[str, list[str]]], console: Console) -> int:
    """Columns a table of these cells takes unwrapped, borders and padding included."""
    table = Table()
    for name, _ in columns:
        table.add_column(name)
    for row in zip(*(values for _, values in columns)):
        table.add_row(*row)
    return Measurement.get(console, console.options.update_width(10**6), table).maximum


def fit(header: list[str], body: list[list[str]], console: Console, shared: tuple[str, ...],
        least_needed: tuple[str, ...]) -> tuple[list[tuple[str, list[str]]], str]:
    """(columns that fit the console, a line naming what went out of the table). First the
    `shared` columns whose value is the same in every row go to the line; then the
    `least_needed` columns are left out in that order, while the table is still too wide."""
    cols = [(h, [row[i] for row in body]) for i, h in enumerate(header)]
    said, left_out = [], []
    if table_width(cols, console) > console.width:
        for name, values in list(cols):
            if name in shared and len(set(values)) == 1:
                cols.remove((name, values))
                if values[0]:
                    said.append(f"{name} {values[0]}")
    for name in least_needed:
        if table_width(cols, console) <= console.width:
            break
        for col in cols:
            if col[0] == name:
                cols.remove(col)
                left_out.append(name)
                break
    note = "; ".join(filter(None, ["every row: " + ", ".join(said) if said else "",
                                   "left out here (report.md has them): " + ", ".join(left_out)
                                   if left_out else ""]))
    return cols, note
