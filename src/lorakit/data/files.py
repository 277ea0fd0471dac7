"""Reading dataset files (JSONL, JSON, CSV, Parquet; a file, a folder, or a weighted list) into rows."""

from __future__ import annotations

import csv
import io
import json
import math
import random
from pathlib import Path

from lorakit.data.formats import Row, to_row

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def read_file(path: str | Path, fmt: str | None = None) -> list[Row]:
    """Every row of one file; an error names the file and line (JSONL, CSV) or row index."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"dataset file {path} does not exist")
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: unsupported dataset file type {path.suffix!r}; use one of {SUFFIXES}")
    rows = [to_row(raw, source, fmt) for raw, source in raw_rows(path)]
    if not rows:
        raise ValueError(f"{path}: the dataset is empty")
    return rows


def raw_rows(path: Path):
    """(parsed row, "file:line") pairs."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield row, f"{path}:row {i}"
        return
    text = read_text(path)
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                yield parse_json(line, f"{path}:{lineno}"), f"{path}:{lineno}"
    elif path.suffix == ".json":
        data = parse_json(text, str(path))
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
        for i, row in enumerate(data):
            yield row, f"{path}:row {i}"
    else:
        yield from csv_rows(path, text)


def csv_rows(path: Path, text: str):
    """(row as {header: field}, "file:line") of a CSV file with a header line. A row with more or fewer
    fields than the header is an error naming its line: an unquoted comma splits a field in two."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        if len(set(header)) != len(header) or not all(h.strip() for h in header):
            raise ValueError(f"{path}:1: the header {header} has an empty or repeated column name")
        line = reader.line_num + 1
        for fields in reader:
            if fields:  # a blank line
                if len(fields) != len(header):
                    n = len(fields)
                    raise ValueError(f"{path}:{line}: {n} field{'s' * (n != 1)}, but the header has {len(header)} "
                                     f"({', '.join(header)}); quote a field that holds a comma: \"a, b\"")
                yield dict(zip(header, fields, strict=True)), f"{path}:{line}"
            line = reader.line_num + 1
    except csv.Error as e:
        raise ValueError(f"{path}:{reader.line_num}: invalid CSV: {e}") from None


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def parse_json(text: str, source: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno} column {e.colno}" if "\n" in text.strip() else f"column {e.colno}"
        raise ValueError(f"{source}: invalid JSON at {where}: {e.msg}") from None


def dataset_files(path: str | Path) -> list[Path]:
    """A file, or every dataset file in a folder (sorted, so the order is reproducible)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES)
        if not files:
            raise ValueError(f"dataset folder {path} holds no {'/'.join(SUFFIXES)} files")
        return files
    return [path]


def read_rows(spec, fmt: str | None = None, seed: int = 0) -> list[Row]:
    """Rows of a dataset spec: a path (file or folder), a list of paths, or a list of
    {"path": ..., "weight": w} where w scales that source's share (0.5 = a random half, 2 = twice)."""
    sources = spec if isinstance(spec, list) else [spec]
    if not sources:
        raise ValueError("dataset is an empty list: name at least one file or folder")
    rows: list[Row] = []
    for i, source in enumerate(sources):
        path, weight = (source.get("path"), source.get("weight", 1.0)) if isinstance(source, dict) else (source, 1.0)
        if path is None or not isinstance(weight, int | float) or weight <= 0:
            raise ValueError(f"dataset entry {i}: needs a 'path' and a positive 'weight', got {source!r}")
        part = [row for file in dataset_files(path) for row in read_file(file, fmt)]
        rows += weighted(part, weight, random.Random(seed * 7919 + i))
    return rows


def weighted(rows: list[Row], weight: float, rng: random.Random) -> list[Row]:
    """`weight` x the rows: whole copies, then a random sample for the fraction."""
    whole, fraction = divmod(weight, 1.0)
    return rows * int(whole) + rng.sample(rows, math.floor(fraction * len(rows) + 0.5))
