"""Reading documents out of a source: local text / jsonl / parquet files, a `datasets`
hub id (or a local dataset folder), or the shipped tiny world.

Every reader yields `Document`s in a fixed order and can say, after any document, where
to resume reading (`reader.cursor()`, a JSON-serialisable list). Bad records (not UTF-8,
not JSON, a missing field, an empty document, an empty file) go to a `BadDocuments`
policy: `error` raises a one-line `DataError` naming the file and line, `skip` counts them
(the first of each kind is logged, totals are reported) -- nothing is dropped silently.
"""

from __future__ import annotations

import glob
import gzip
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from twotower_train.config import BadDocumentPolicy, ConfigError, DataSourceConfig, SourceKind
from twotower_train.errors import MissingFile, first_line


class DataError(ConfigError):
    """Data the run cannot use; the message is one line naming the file and line."""


class Document(NamedTuple):
    text: str  # the document, or the completion of a prompt/completion pair
    prompt: str | None  # SFT: tokens of the prompt carry no loss
    where: str  # "path:line" / "path row 7", for messages


REASONS = {
    "not_utf8": "not valid UTF-8",
    "not_json": "not valid JSON",
    "not_object": "not a JSON object",
    "missing_field": "missing field",
    "not_string": "field is not a string",
    "empty": "empty document",
    "empty_file": "empty file",
    "short": "fewer tokens than data.min_doc_tokens",
}


class BadDocuments:
    """What to do with a bad record: raise (`error`) or count and go on (`skip`)."""

    def __init__(self, policy: BadDocumentPolicy, label: str, log: Callable[[str], None]):
        self.policy = policy
        self.label = label
        self.log = log
        self.counts: dict[str, int] = {}
        self.first: dict[str, str] = {}

    def __call__(self, where: str, reason: str, detail: str) -> None:
        if self.policy == BadDocumentPolicy.error:
            raise DataError(
                f"{where}: {detail} (data.on_bad_document=skip skips bad documents, counted)"
            )
        if reason not in self.counts:
            self.first[reason] = where
            self.log(f"{self.label}: skipping {where}: {detail} (further ones are counted)")
        self.counts[reason] = self.counts.get(reason, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """'3 not valid JSON (first at a.jsonl:7), 1 empty document (first at b.jsonl:2)'."""
        return ", ".join(
            f"{n:,} {REASONS[r]} (first at {self.first[r]})" for r, n in sorted(self.counts.items())
        )

    def state(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "first": dict(self.first)}

    def merge(self, state: dict[str, Any]) -> None:
        for reason, n in state["counts"].items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            self.first.setdefault(reason, state["first"][reason])


def make_document(
    record: Mapping[str, Any], src: DataSourceConfig, where: str, bad: BadDocuments
) -> Document | None:
    """A record's document (`field`, or `prompt_field` + `completion_field`), or None if bad."""
    if src.prompt_field is None:
        names = (src.field,)
    else:
        names = (src.prompt_field, src.completion_field)
    values = []
    for name in names:
        try:
            value = record[name]
        except KeyError:
            bad(where, "missing_field", f"no field '{name}'")
            return None
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad(where, "not_utf8", f"field '{name}' is not valid UTF-8 (byte {exc.start})")
                return None
        if not isinstance(value, str):
            kind = "null" if value is None else type(value).__name__
            bad(where, "not_string", f"field '{name}' is {kind}, not a string")
            return None
        values.append(value)
    if not values[-1].strip():
        bad(where, "empty", f"field '{names[-1]}' is empty")
        return None
    if len(values) == 1:
        return Document(values[0], None, where)
    return Document(values[1], values[0], where)


# ---------------------------------------------------------------------------------------
# Local files.
# ---------------------------------------------------------------------------------------

SUFFIXES = {
    SourceKind.text: (".txt", ".txt.gz", ".text", ".md"),
    SourceKind.jsonl: (".jsonl", ".jsonl.gz", ".ndjson", ".json"),
    SourceKind.parquet: (".parquet",),
}


def resolve_files(path: str, kind: SourceKind, label: str) -> list[Path]:
    """A file, a folder (its files with the kind's suffixes, recursively) or a glob,
    sorted by name. Raises FileNotFoundError when nothing is there."""
    expanded = str(Path(path).expanduser())
    if any(ch in path for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
        if not files:
            raise MissingFile(f"{label}: no file matches {path}")
        return files
    p = Path(expanded)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES[kind]))
        if not files:
            raise MissingFile(f"{label}: no {'/'.join(SUFFIXES[kind])} files in {p}")
        return files
    if not p.is_file():
        raise MissingFile(f"{label}: {p} does not exist")
    return [p]


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _decode_line(raw: bytes, where: str, bad: BadDocuments) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad(
            where,
            "not_utf8",
            f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})",
        )
        return None


class FileReader:
    """Lines of a list of files; cursor = [file index, byte offset, line number]."""

    unit = "B"

    def __init__(self, files: list[Path], src: DataSourceConfig, bad: BadDocuments):
        self.files = files
        self.src = src
        self.bad = bad
        self._pos = [0, 0, 0]
        self._done = 0  # bytes of the files finished in this pass
        self._raw = None  # the open file (compressed bytes for .gz), for progress
        self.total = sum(f.stat().st_size for f in files)

    def progress(self) -> int:
        """Bytes read so far in this pass (of `total`)."""
        raw = self._raw
        try:
            return self._done + (raw.tell() if raw is not None and not raw.closed else 0)
        except (OSError, ValueError):
            return self._done

    def cursor(self) -> list[int]:
        return list(self._pos)

    def fingerprint(self) -> list:
        return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in self.files]

    def documents(self, cursor: list[int] | None = None) -> Iterator[Document]:
        start_file, start_off, start_line = cursor or (0, 0, 0)
        self._done = sum(f.stat().st_size for f in self.files[:start_file])
        for fi in range(start_file, len(self.files)):
            off, line = (start_off, start_line) if fi == start_file else (0, 0)
            self._pos = [fi, off, line]
            yield from self._file_documents(fi, off, line)
            self._done += self.files[fi].stat().st_size
        self._pos = [len(self.files), 0, 0]

    def _lines(self, fi: int, off: int, line: int) -> Iterator[tuple[bytes, int]]:
        """(raw line, its line number); keeps `_pos` just after the line."""
        path = self.files[fi]
        with open(path, "rb") as raw:
            self._raw = raw
            f = gzip.GzipFile(fileobj=raw, mode="rb") if path.suffix == ".gz" else raw
            if off:
                f.seek(off)
            pos = self._pos
            for data in f:
                line += 1
                off += len(data)
                pos[1] = off
                pos[2] = line
                yield data, line
        self._raw = None

    def _file_documents(self, fi: int, off: int, line: int) -> Iterator[Document]:
        raise NotImplementedError


class JsonlReader(FileReader):
    def _file_documents(self, fi: int, off: int, line: int) -> Iterator[Document]:
        path = str(self.files[fi])
        records = 0
        for raw, n in self._lines(fi, off, line):
            if not raw.strip():
                continue  # blank lines (a trailing newline) are not records
            records += 1
            where = f"{path}:{n}"
            text = _decode_line(raw, where, self.bad)
            if text is None:
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                self.bad(where, "not_json", f"not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(record, dict):
                self.bad(where, "not_object", f"not a JSON object ({type(record).__name__})")
                continue
            doc = make_document(record, self.src, where, self.bad)
            if doc is not None:
                yield doc
        if off == 0 and records == 0:
            self.bad(path, "empty_file", "empty file (no records)")


class TextReader(FileReader):
    """Plain text: one document per paragraph (blank-line separated), line, or file."""

    def _file_documents(self, fi: int, off: int, line: int) -> Iterator[Document]:
        path = str(self.files[fi])
        per_line = self.src.text_unit.value == "line"
        if self.src.text_unit.value == "file":
            yield from self._whole_file(fi, off)
            return
        lines: list[str] = []
        first, broken, content = 0, False, False
        for raw, n in self._lines(fi, off, line):
            if raw.strip():
                content = True
                text = _decode_line(raw, f"{path}:{n}", self.bad)
                if not lines and not broken:
                    first = n
                if text is None:
                    broken = True  # the whole document is skipped (counted)
                else:
                    lines.append(text.rstrip("\r\n"))
                if not per_line:
                    continue
            if lines and not broken:
                yield Document("\n".join(lines), None, f"{path}:{first}")
            lines, broken = [], False
        if lines and not broken:
            yield Document("\n".join(lines), None, f"{path}:{first}")
        if off == 0 and not content:
            self.bad(path, "empty_file", "empty file")

    def _whole_file(self, fi: int, off: int) -> Iterator[Document]:
        path = self.files[fi]
        if off:  # resumed after this file's only document
            return
        with _open(path) as f:
            raw = f.read()
        if not raw.strip():
            self.bad(str(path), "empty_file", "empty file")
            return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            n = raw[: exc.start].count(b"\n") + 1
            col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
            byte = raw[exc.start]
            self.bad(
                f"{path}:{n}", "not_utf8", f"not valid UTF-8 (byte 0x{byte:02x} at column {col})"
            )
            return
        self._pos = [fi, len(raw), text.count("\n") + 1]
        yield Document(text.rstrip("\n"), None, f"{path}:1")


class ParquetReader(FileReader):
    """Rows of parquet files; cursor = [file index, row, 0]."""

    def __init__(self, files: list[Path], src: DataSourceConfig, bad: BadDocuments):
        super().__init__(files, src, bad)
        import pyarrow.parquet as pq

        self._pq = pq
        self.columns = _columns(src)
        for f in files:
            try:
                names = pq.read_schema(f).names
            except Exception as exc:  # pyarrow: not a parquet file, truncated, ...
                raise DataError(f"{f}: not a readable parquet file ({first_line(exc)})") from None
            missing = [c for c in self.columns if c not in names]
            if missing:
                raise DataError(f"{f}: no column '{missing[0]}' (columns: {', '.join(names)})")

    def documents(self, cursor: list[int] | None = None) -> Iterator[Document]:
        start_file, start_row, _ = cursor or (0, 0, 0)
        self._done = sum(f.stat().st_size for f in self.files[:start_file])
        for fi in range(start_file, len(self.files)):
            path = self.files[fi]
            pf = self._pq.ParquetFile(path)
            row0 = start_row if fi == start_file else 0
            self._pos = [fi, row0, 0]
            if pf.metadata.num_rows == 0:
                self.bad(str(path), "empty_file", "empty file (no rows)")
            base = 0
            for rg in range(pf.num_row_groups):
                n_rows = pf.metadata.row_group(rg).num_rows
                if base + n_rows <= row0:
                    base += n_rows
                    continue
                table = pf.read_row_group(rg, columns=self.columns)
                cols = [table.column(c).to_pylist() for c in self.columns]
                for i in range(max(0, row0 - base), n_rows):
                    self._pos[1] = base + i + 1
                    record = {c: col[i] for c, col in zip(self.columns, cols)}
                    doc = make_document(record, self.src, f"{path} row {base + i + 1}", self.bad)
                    if doc is not None:
                        yield doc
                base += n_rows
            self._done += path.stat().st_size
        self._pos = [len(self.files), 0, 0]


# ---------------------------------------------------------------------------------------
# `datasets`: a hub id, a local dataset folder, or a folder saved with save_to_disk.
# ---------------------------------------------------------------------------------------


def _columns(src: DataSourceConfig) -> list[str]:
    if src.prompt_field is None:
        return [src.field]
    return [src.prompt_field, src.completion_field]


def open_hub_dataset(src: DataSourceConfig, streaming: bool, label: str):
    """`datasets.load_from_disk` for a save_to_disk folder, else `datasets.load_dataset`."""
    import datasets

    path = Path(src.path).expanduser()
    saved = path.is_dir() and any(
        (path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")
    )
    if not path.exists() and src.path.startswith(("/", ".", "~")):
        raise MissingFile(f"{label}: {path} does not exist")
    try:
        if saved:
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if src.split not in ds:
                    raise DataError(f"{label}: no split '{src.split}' (splits: {', '.join(ds)})")
                ds = ds[src.split]
            return ds.to_iterable_dataset() if streaming else ds
        return datasets.load_dataset(
            str(path) if path.exists() else src.path,
            src.name,
            split=src.split,
            revision=src.revision,
            streaming=streaming,
        )
    except (DataError, FileNotFoundError):
        raise
    except Exception as exc:
        raise DataError(f"{label}: cannot load dataset '{src.path}': {first_line(exc)}") from None


class HubReader:
    """Rows of a `datasets` Dataset (map-style, cursor = [row]) or IterableDataset
    (streaming, cursor = [row, the dataset's own state_dict])."""

    unit = "rows"

    def __init__(self, src: DataSourceConfig, streaming: bool, bad: BadDocuments, label: str):
        self.src = src
        self.bad = bad
        self.streaming = streaming
        self.ds = open_hub_dataset(src, streaming, label)
        self.name = f"{src.path} (split {src.split})"
        self.columns = _columns(src)
        names = self.ds.column_names
        if names is not None:
            missing = [c for c in self.columns if c not in names]
            if missing:
                raise DataError(
                    f"{self.name}: no column '{missing[0]}' (columns: {', '.join(names)})"
                )
        self._start_state = self.ds.state_dict() if streaming else None
        self._row = 0
        self.total = None if streaming else len(self.ds)

    def progress(self) -> int:
        return self._row

    def cursor(self) -> list:
        if self.streaming:
            return [self._row, self.ds.state_dict()]
        return [self._row]

    def fingerprint(self) -> list:
        fp = None if self.streaming else getattr(self.ds, "_fingerprint", None)
        return [self.src.path, self.src.name, self.src.split, self.src.revision, fp]

    def documents(self, cursor: list | None = None) -> Iterator[Document]:
        self._row = cursor[0] if cursor else 0
        first_row = self._row
        if self.streaming:
            self.ds.load_state_dict(cursor[1] if cursor else self._start_state)
            for record in self.ds:
                self._row += 1
                where = f"{self.name} row {self._row}"
                doc = make_document(record, self.src, where, self.bad)
                if doc is not None:
                    yield doc
        else:
            ds = self.ds.select_columns(self.columns)
            n = len(ds)
            for start in range(self._row, n, 1024):
                batch = ds[start : min(start + 1024, n)]
                cols = [batch[c] for c in self.columns]
                for i in range(len(cols[0])):
                    self._row = start + i + 1
                    record = {c: col[i] for c, col in zip(self.columns, cols)}
                    doc = make_document(record, self.src, f"{self.name} row {self._row}", self.bad)
                    if doc is not None:
                        yield doc
        if first_row == 0 and self._row == 0:
            self.bad(self.name, "empty_file", "empty dataset (no rows)")


class ListReader:
    """Documents held in memory (the tiny world's held-out split)."""

    unit = "docs"

    def __init__(self, docs: list[Document]):
        self.docs = docs
        self._i = 0
        self.total = len(docs)

    def progress(self) -> int:
        return self._i

    def cursor(self) -> list[int]:
        return [self._i]

    def fingerprint(self) -> list:
        return [len(self.docs)]

    def documents(self, cursor: list[int] | None = None) -> Iterator[Document]:
        start = cursor[0] if cursor else 0
        for i in range(start, len(self.docs)):
            self._i = i + 1
            yield self.docs[i]
