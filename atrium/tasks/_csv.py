"""CSV statistics on Polars: the body of ``data_processing``, run in a job worker process.

Two passes over the text. The standard library's strict CSV reader (C, streaming, nothing
kept) checks the structure: it names the line of a malformed document exactly as the
pure-Python summary did, and counts the rows. Polars then parses only the selected
columns, as text, and computes every statistic with its own kernels. Where Polars reads
the document differently from the standard reader (a lone carriage return as a line end,
a quote inside an unquoted field), the cells are taken from the standard reader instead,
so the summary never depends on which parser read it.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

import polars as pl

from ._registry import PermanentJobError

TOP_VALUES = 50
"""Distinct values listed per text column; the count of distinct values is always complete."""

# What Python's str.strip() removes (every c with c.isspace(); Polars' default set is
# Rust's, which differs). Written out: computing it cost each worker process 80 ms.
_WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
    "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
# Numbers Polars and Python's float() both read, to the same double: anything else goes
# through float() itself (``1_000``, other scripts' digits, ``Infinity``)...
_PLAIN_NUMBER = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
# ... unless it cannot be a number for float() either (a superset of what float() takes:
# \d is any script's decimal digit, as in Python).
_FLOAT_LIKE = r"(?i)^[+-]?([\d_.]+(e[+-]?[\d_]+)?|inf|infinity|nan)$"
BATCH_CELLS = 1 << 20
"""Cells summarised per Polars call (a batch of whole columns, at least one)."""


def summarise_csv(text: str, columns: list[str] | None) -> dict[str, Any]:
    """``{"rows", "columns", "stats"}`` for the CSV ``text`` (the first row names the
    columns), restricted to ``columns`` when given. Per column: count, mean, min, max and
    population standard deviation when every non-empty value is a finite number, else
    count, distinct and the ``TOP_VALUES`` most frequent values (ties in order of first
    appearance). Raises PermanentJobError naming the line of a malformed document, or the
    requested columns the header lacks."""
    names, rows, blank_lines = _check(text)
    index = {name: i for i, name in enumerate(names)}
    chosen = names if columns is None else list(columns)
    missing = [c for c in chosen if c not in index]
    if missing:
        raise PermanentJobError(f"no such column(s) in the CSV header: {', '.join(missing)}")
    picks = sorted({index[c] for c in chosen})
    stats = _summaries(_read(text, picks, rows + blank_lines))
    return {
        "rows": rows,
        "columns": chosen,
        "stats": {name: stats[str(index[name])] for name in dict.fromkeys(chosen)},
    }


def _check(text: str) -> tuple[list[str], int, int]:
    """The header's names, the number of records and of blank lines. Raises
    PermanentJobError naming the line of a malformed document."""
    reader = csv.reader(io.StringIO(text), strict=True)
    rows = blank = 0
    try:
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise PermanentJobError("malformed CSV: there is no header row")
        names = [h.strip() for h in header]
        if len(set(names)) != len(names):
            raise PermanentJobError("malformed CSV: the header repeats a column name")
        width = len(names)
        for row in reader:
            if not row:
                blank += 1  # blank lines carry no record
            elif len(row) != width:
                raise PermanentJobError(
                    f"malformed CSV: line {reader.line_num} has {len(row)} fields,"
                    f" the header has {width}"
                )
            else:
                rows += 1
    except csv.Error as error:
        raise PermanentJobError(f"malformed CSV: line {reader.line_num}: {error}") from None
    return names, rows, blank


def _read(text: str, picks: list[int], height: int) -> pl.DataFrame:
    """The columns at ``picks`` as text, named by their index (a blank line is a row of
    nulls: no statistic counts it)."""
    names = [str(i) for i in picks]
    if "\r" not in text or text.count("\r") == text.count("\r\n"):
        try:
            frame = pl.read_csv(
                text.encode("utf-8"),
                columns=picks,
                infer_schema=False,
                quote_char='"',
                comment_prefix=None,
                raise_if_empty=False,
            )
        except (pl.exceptions.PolarsError, UnicodeEncodeError):
            pass  # a document the strict reader took and Polars does not: below
        else:
            if frame.height == height and frame.width == len(picks):
                return frame.rename(dict(zip(frame.columns, names, strict=True)))
    reader = csv.reader(io.StringIO(text), strict=True)
    next(reader)
    kept: dict[int, list[str]] = {i: [] for i in picks}
    for row in reader:
        if row:
            for i in picks:
                kept[i].append(row[i])
    return pl.DataFrame({str(i): pl.Series(kept[i], dtype=pl.String) for i in picks})


def _summaries(frame: pl.DataFrame) -> dict[str, dict[str, Any]]:
    """Each column's statistics, keyed by the frame's column names."""
    stats: dict[str, dict[str, Any]] = {}
    # Long batches of (column, value) cells: one Polars call per batch, not per column
    # (a CSV may have 20,000 columns), and a batch's copy of the cells stays small.
    width = max(1, BATCH_CELLS // max(1, frame.height))
    for start in range(0, frame.width, width):
        stats.update(_batch(frame.select(frame.columns[start : start + width])))
    return stats


def _batch(frame: pl.DataFrame) -> dict[str, dict[str, Any]]:
    value, number = pl.col("value"), pl.col("number")
    cells = (
        frame.with_row_index("row")
        .unpivot(index="row", variable_name="column", value_name="value")
        .with_columns(value.str.strip_chars(_WHITESPACE))
        .filter(value != "")  # and not null: empty cells and blank lines count nowhere
        .with_columns(
            number=pl.when(value.str.contains(_PLAIN_NUMBER)).then(
                value.cast(pl.Float64, strict=False)
            ),
            maybe=value.str.contains(_FLOAT_LIKE),
        )
    )
    columns = cells.group_by("column").agg(
        pl.len().alias("count"),
        number.null_count().alias("odd"),
        (~pl.col("maybe")).sum().alias("impossible"),
        (~number.is_finite()).sum().alias("infinite"),
        number.mean().alias("mean"),
        number.min().alias("min"),
        number.max().alias("max"),
        number.std(ddof=0).alias("stddev"),
    )
    stats = {n: _text(0, 0, {}) for n in frame.columns}
    texts = []
    for row in columns.iter_rows(named=True):
        name = row["column"]
        if row["infinite"] or row["impossible"]:
            texts.append(name)
        elif not row["odd"]:
            stats[name] = _numeric(row["count"], row["mean"], row["min"], row["max"], row["stddev"])
        elif (numbers := _odd_numbers(cells.filter(pl.col("column") == name))) is not None:
            stats[name] = _numeric(
                len(numbers), numbers.mean(), numbers.min(), numbers.max(), numbers.std(ddof=0)
            )
        else:
            texts.append(name)
    if texts:
        stats.update(_text_summaries(cells.filter(pl.col("column").is_in(texts))))
    return stats


def _odd_numbers(cells: pl.DataFrame) -> pl.Series | None:
    """One column's numbers when every value Polars did not read is a finite number by
    Python's ``float()`` (``1_000``, other scripts' digits), else None."""
    odd: dict[str, float] = {}
    for text in cells.filter(pl.col("number").is_null())["value"].unique():
        try:
            number = float(text)
        except ValueError:
            return None
        if not math.isfinite(number):
            return None
        odd[text] = number
    parsed = cells["value"].replace_strict(odd, default=None, return_dtype=pl.Float64)
    return cells["number"].fill_null(parsed)


def _text_summaries(cells: pl.DataFrame) -> dict[str, dict[str, Any]]:
    """Count, distinct and the top values of each column (ties: first seen first)."""
    counted = cells.group_by("column", "value").agg(pl.len().alias("count"), pl.col("row").min())
    stats = {
        column: _text(count, distinct, {})
        for column, count, distinct in counted.group_by("column")
        .agg(pl.col("count").sum(), pl.len().alias("distinct"))
        .iter_rows()
    }
    top = (
        counted.sort(["column", "count", "row"], descending=[False, True, False])
        .group_by("column", maintain_order=True)
        .head(TOP_VALUES)
    )
    for column, value, count in top.select("column", "value", "count").iter_rows():
        stats[column]["values"][value] = count
    return stats


def _numeric(count: int, mean: Any, low: Any, high: Any, stddev: Any) -> dict[str, Any]:
    return {
        "type": "numeric",
        "count": count,
        "mean": float(mean),
        "min": float(low),
        "max": float(high),
        "stddev": float(stddev),
    }


def _text(count: int, distinct: int, values: dict[str, int]) -> dict[str, Any]:
    return {"type": "text", "count": count, "distinct": distinct, "values": values}
