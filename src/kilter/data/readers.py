"""Read record files of every supported format; write JSONL atomically.

Formats, chosen by extension (or a folder):

* ``.jsonl`` -- one JSON object per line; blank lines are skipped; errors name the line (1-based).
* ``.json``  -- a list of objects, or ``{"data": [...]}``; errors name ``record N`` (1-based).
* ``.csv`` / ``.tsv`` -- a header row, then one row per record; errors name the line in the
  file (the header is line 1).  List-valued fields (``responses``, ``ranks``, ``messages``,
  or message lists in ``prompt``/``chosen``/...) are JSON text inside the cell; ``label`` is
  ``true``/``false``; an empty ``strength`` cell means "not given".
* ``.parquet`` -- errors name ``row N`` (1-based).
* a folder written by ``datasets.Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``
  (pick the split with ``split``; default ``"train"``); errors name ``row N``.

A malformed row raises :class:`DataError` ``"{file}:{line}: field '{field}': {problem}"``
unless ``skip_invalid`` is set, in which case it is skipped, counted, and reported in one
warning line.
"""

from __future__ import annotations

import ast
import csv
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kilter.data.records import RECORD_KINDS, FieldError, is_messages, validate_record
from kilter.errors import DataError, KilterError
from kilter.runs import atomic_write_file

__all__ = ["SUPPORTED_EXTENSIONS", "Records", "iter_raw_rows", "read_records", "write_jsonl"]


SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")

# Columns whose CSV cells hold JSON lists, and columns whose cells may hold a JSON message list.
_CSV_LIST_FIELDS = frozenset({"responses", "ranks", "messages", "conversations"})
_CSV_MAYBE_MESSAGES = frozenset({"prompt", "completion", "chosen", "rejected"})
_CSV_LABELS = {"true": True, "false": False, "1": 1, "0": 0}


@dataclass
class Records:
    """Validated, normalised rows of one file, plus how many invalid rows were skipped."""

    rows: list[dict]
    kind: str
    source: str
    n_skipped: int = 0
    first_error: str | None = None
    layout: str = "kilter"
    """The public layout the rows were read in (kilter.data.formats)."""
    notes: list[str] = field(default_factory=list)
    """Lines the command should print about how the data was read."""

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


# One raw row: (location such as "data/x.jsonl:7", the parsed row or None, a problem or None).
RawRow = tuple[str, Any, "str | None"]


def _jsonl_rows(path: Path, name: str) -> Iterator[RawRow]:
    with path.open(encoding="utf-8-sig") as handle:  # a BOM (Windows editors write one) is not part of row 1
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{name}:{number}"
            try:
                yield where, json.loads(line.rstrip("\r\n")), None
            except json.JSONDecodeError as exc:
                yield where, None, f"not valid JSON ({exc.msg} at column {exc.colno})"


def _json_rows(path: Path, name: str) -> Iterator[RawRow]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{name}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a JSON list of records or an object {{\"data\": [...]}}")
    for number, row in enumerate(data, start=1):
        yield f"{name}:record {number}", row, None


def _python_repr_list(text: str) -> bool:
    """True when a cell is a Python list literal that is not JSON (what pandas' to_csv writes)."""
    try:
        return isinstance(ast.literal_eval(text.strip()), list)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return False


def _csv_list_error(field: str, exc: json.JSONDecodeError) -> FieldError:
    return FieldError(field, f"the cell looks like a list but is not valid JSON ({exc.msg} at column {exc.colno}); "
                             "pandas' to_csv writes Python repr: write JSON lists in the cell "
                             "(json.dumps), or save the frame with to_json(orient='records', lines=True)")


def _csv_cell(field: str, text: str | None) -> Any:
    """Turn one CSV cell into the value a JSON file would have held."""
    if text is None:  # the row had fewer cells than the header
        return None
    if field in _CSV_LIST_FIELDS:
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            if text.lstrip().startswith(("[", "{")):
                raise _csv_list_error(field, exc) from None
            return text  # validation reports it, showing the cell
    if field in _CSV_MAYBE_MESSAGES and text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            if _python_repr_list(text):
                raise _csv_list_error(field, exc) from None
            return text  # a prompt that merely starts with "[", e.g. "[INST] ..."
        return value if is_messages(value) else text
    if field == "strength":
        if not text.strip():
            return None
        try:
            return float(text)
        except ValueError:
            return text
    if field == "label" and text.strip().lower() in _CSV_LABELS:
        return _CSV_LABELS[text.strip().lower()]
    return text


def _csv_rows(path: Path, name: str, delimiter: str) -> Iterator[RawRow]:
    csv.field_size_limit(2**31 - 1)  # long transcripts exceed the default 128 KiB per cell
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        while True:
            first_line = reader.line_num + 1  # a quoted cell may span lines: report where the row starts
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield f"{name}:{first_line}", None, f"not valid CSV ({exc})"
                continue
            if not cells or all(not c.strip() for c in cells):
                continue
            extra = [c for c in cells[len(header):] if c.strip()]
            if extra:
                yield (f"{name}:{first_line}", None, f"{len(cells)} cells but the header names {len(header)} columns "
                       f"(extra: {extra[0][:40]!r}); quote cells that hold the delimiter")
                continue
            padded = cells + [None] * (len(header) - len(cells))
            try:
                row = {column: _csv_cell(column, text) for column, text in zip(header, padded)}
            except FieldError as exc:
                yield f"{name}:{first_line}", None, str(exc)
                continue
            yield f"{name}:{first_line}", row, None


def _parquet_rows(path: Path, name: str) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as exc:  # the types pyarrow raises for a damaged file
        raise DataError(f"{name}: cannot read as Parquet ({exc})") from None
    number = 0
    try:
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield f"{name}:row {number}", row, None
    except (pa.ArrowException, OSError, ValueError) as exc:  # a damaged data page shows only when it is read
        raise DataError(f"{name}: cannot read as Parquet after row {number} ({str(exc).splitlines()[0]}); "
                        "the file is damaged: write it again") from None


def _hf_folder_rows(path: Path, name: str, split: str | None) -> Iterator[RawRow]:
    is_dict = (path / "dataset_dict.json").is_file()
    if not is_dict and not (path / "state.json").is_file():
        raise DataError(
            f"{name}: a folder, but not a dataset saved with datasets' save_to_disk "
            "(no dataset_dict.json or state.json inside)"
        )
    import datasets
    import pyarrow as pa

    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
        # a broken state.json / dataset_info.json, a missing or truncated .arrow file
        raise DataError(f"{name}: cannot load this save_to_disk folder ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); save the dataset again") from None
    if is_dict:
        wanted = split or "train"
        if wanted not in loaded:
            raise DataError(f"{name}: no split {wanted!r}; available splits: {', '.join(sorted(loaded))}")
        loaded = loaded[wanted]
        name = f"{name}[{wanted}]"
    elif split is not None:
        raise DataError(f"{name}: holds a single dataset, not a DatasetDict, so split={split!r} does not apply")
    number = 0
    try:
        for number, row in enumerate(loaded, start=1):
            yield f"{name}:row {number}", row, None
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise DataError(f"{name}: cannot read this save_to_disk folder after row {number} "
                        f"({str(exc).splitlines()[0]}); save the dataset again") from None


def iter_raw_rows(source: str | Path, split: str | None = None) -> Iterator[RawRow]:
    """Yield ``(location, row, problem)`` for every row of a data file, unvalidated.

    ``problem`` is set (and ``row`` is None) when the row could not even be parsed, e.g. a
    JSONL line that is not JSON.  File-level problems raise :class:`DataError` at once.
    """
    path = Path(source)
    name = str(source)
    if not path.exists():
        raise DataError(f"file not found: {name}")
    if path.is_dir():
        rows = _hf_folder_rows(path, name, split)
    else:
        suffix = path.suffix.lower()
        if suffix not in SUPPORTED_EXTENSIONS:
            raise DataError(
                f"{name}: unsupported file extension {suffix or '(none)'!r}; supported: "
                f"{', '.join(SUPPORTED_EXTENSIONS)}, or a folder saved by datasets' save_to_disk"
            )
        if split is not None and split != "train":
            raise DataError(f"{name}: split={split!r} applies only to a folder saved by datasets' save_to_disk")
        if suffix == ".jsonl":
            rows = _jsonl_rows(path, name)
        elif suffix == ".json":
            rows = _json_rows(path, name)
        elif suffix == ".parquet":
            rows = _parquet_rows(path, name)
        else:
            rows = _csv_rows(path, name, "\t" if suffix == ".tsv" else ",")
    try:
        yield from rows
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_records(
    source: str | Path,
    kind: str,
    skip_invalid: bool = False,
    split: str | None = None,
    allow_empty: bool = False,
    to_records: Callable[[Any], list[dict]] | None = None,
) -> Records:
    """Read and validate every row of ``source`` as records of ``kind``.

    Args:
        source: a ``.jsonl``/``.json``/``.csv``/``.tsv``/``.parquet`` file or a folder saved by
            ``datasets``' ``save_to_disk``.
        kind: one of :data:`~kilter.data.records.RECORD_KINDS`.
        skip_invalid: skip malformed rows (counted in ``n_skipped``, one warning) instead of
            raising on the first.
        split: the split of a saved ``DatasetDict`` (default ``"train"``).
        allow_empty: return an empty result instead of raising when no valid row is found.
        to_records: turns one raw row into validated records (default: ``validate_record(row, kind)``);
            :mod:`kilter.data.formats` passes one that reads a public layout.
    """
    if kind not in RECORD_KINDS:
        raise KilterError(f"unknown record kind {kind!r}; expected one of {', '.join(RECORD_KINDS)}")
    rows: list[dict] = []
    skipped = 0
    first_error: str | None = None
    for where, row, problem in iter_raw_rows(source, split):
        try:
            if problem is not None:
                raise DataError(problem)
            rows.extend(to_records(row) if to_records is not None else [validate_record(row, kind)])
        except DataError as exc:
            message = f"{where}: {exc}"
            if not skip_invalid:
                raise DataError(message) from None
            skipped += 1
            first_error = first_error or message
    if not rows and not allow_empty:
        detail = f" (skipped {skipped} invalid; first: {first_error})" if skipped else ""
        raise DataError(f"{source}: no valid {kind} records{detail}")
    return Records(rows=rows, kind=kind, source=str(source), n_skipped=skipped, first_error=first_error)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Write ``rows`` as JSONL atomically (:func:`kilter.runs.atomic_write_file`); return how many.

    A crash mid-write leaves any previous file untouched rather than half-written.
    """
    count = 0

    def write(tmp: Path) -> None:
        nonlocal count
        with open(tmp, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1

    atomic_write_file(Path(path), write)
    return count
