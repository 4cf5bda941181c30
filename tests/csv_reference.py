"""The pure-Python CSV summary that ``data_processing`` ran before Polars (issue 19),
kept verbatim as the reference the equivalence test and ``bench/jobs.py --csv`` compare
the new summary with. Nothing in ``atrium`` imports it."""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from typing import Any

from atrium.tasks import PermanentJobError

TOP_VALUES = 50


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_csv(text: str, columns: list[str] | None) -> tuple[list[str], list[list[str]]]:
    """The header and the rows of ``text`` (restricted to ``columns``). Raises
    PermanentJobError naming the line for a malformed document."""
    reader = csv.reader(io.StringIO(text), strict=True)
    try:
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise PermanentJobError("malformed CSV: there is no header row")
        names = [h.strip() for h in header]
        if len(set(names)) != len(names):
            raise PermanentJobError("malformed CSV: the header repeats a column name")
        rows = []
        for row in reader:
            if not row:
                continue  # blank lines carry no record
            if len(row) != len(names):
                raise PermanentJobError(
                    f"malformed CSV: line {reader.line_num} has {len(row)} fields,"
                    f" the header has {len(names)}"
                )
            rows.append(row)
    except csv.Error as error:
        raise PermanentJobError(f"malformed CSV: line {reader.line_num}: {error}") from None
    if columns is None:
        return names, rows
    missing = [c for c in columns if c not in names]
    if missing:
        raise PermanentJobError(f"no such column(s) in the CSV header: {', '.join(missing)}")
    picks = [names.index(c) for c in columns]
    return list(columns), [[row[i] for i in picks] for row in rows]


def column_stats(values: list[str]) -> dict[str, Any]:
    """Numeric columns (every non-empty value a finite number): count, mean, min, max and
    population standard deviation. Others: count, distinct and the most frequent values."""
    present = [v.strip() for v in values if v.strip()]
    numbers = [_number(v) for v in present]
    if present and all(n is not None for n in numbers):
        xs = [n for n in numbers if n is not None]
        mean = math.fsum(xs) / len(xs)
        variance = math.fsum((x - mean) ** 2 for x in xs) / len(xs)
        return {
            "type": "numeric",
            "count": len(xs),
            "mean": mean,
            "min": min(xs),
            "max": max(xs),
            "stddev": math.sqrt(variance),
        }
    counts = Counter(present)
    return {
        "type": "text",
        "count": len(present),
        "distinct": len(counts),
        "values": dict(counts.most_common(TOP_VALUES)),
    }


def summarise_csv(text: str, columns: list[str] | None) -> dict[str, Any]:
    """What ``data_processing`` returned, computed as it was (one thread, lists of rows)."""
    names, rows = parse_csv(text, columns)
    stats = {name: column_stats([row[i] for row in rows]) for i, name in enumerate(names)}
    return {"rows": len(rows), "columns": names, "stats": stats}
