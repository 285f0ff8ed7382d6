"""Read a text corpus (plain text, JSONL, Parquet or a HuggingFace ``datasets`` directory).

Every document keeps its position in the source (line number or row number, 0-based) so that
results can point back at the exact line of the corpus. Nothing is dropped silently: lines that
are not valid UTF-8 are counted in ``Corpus.undecodable`` and logged.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FORMATS = ("text", "jsonl", "parquet", "datasets")
# A NUL byte this early means binary data (or UTF-16), never UTF-8 prose.
_SNIFF_BYTES = 64 * 1024
_BATCH_ROWS = 4096


class CorpusError(ValueError):
    """A corpus that cannot be read; the message is one clear line for the user."""


@dataclass(frozen=True)
class Document:
    index: int  # 0-based position in the corpus: line number (text/JSONL) or row number
    text: str
    offset: int = -1  # byte offset of its line in a text/JSONL file (where a shard's read seeks to); -1: none


@dataclass(frozen=True)
class Corpus:
    documents: list[Document]
    source: str  # absolute path as given
    format: str  # "text" | "jsonl" | "parquet" | "datasets"
    sha256: str  # of the raw bytes (for a directory: its files in sorted order, name + bytes)
    undecodable: int  # lines skipped because they were not valid UTF-8
    provenance: dict[str, Any] = field(default_factory=dict)  # "<corpus>.provenance.json" if present


@dataclass
class LineStats:
    undecodable: int = 0
    decoded: int = 0  # non-blank lines that decoded; 0 with undecodable > 0 means "not UTF-8"


@dataclass(frozen=True)
class CorpusSource:
    """A corpus file read as a stream: no process needs every document in memory.

    ``documents(start, stop)`` yields the documents whose index is in [start, stop), in corpus
    order, after at most ``max_documents`` documents from the start of the corpus.
    """

    path: Path
    format: str
    text_field: str = "text"
    max_documents: int | None = None

    @property
    def source(self) -> str:
        return str(self.path)

    def documents(self, start: int = 0, stop: int | None = None, stats: LineStats | None = None,
                  offset: int | None = None) -> Iterator[Document]:
        """``offset``: the byte offset of document ``start``'s line (``Document.offset``, text and JSONL):
        the read seeks there instead of reading the file from its start. The plan already applied
        ``max_documents`` to such a range, so it is not counted again."""
        stats = stats if stats is not None else LineStats()
        p, fmt = self.path, self.format
        seek = offset if fmt in ("text", "jsonl") and offset is not None and offset >= 0 else None
        docs: Iterable[Document]
        if fmt == "text":
            docs = (Document(i, t, o) for i, o, t in _iter_lines(p, stats, seek, start))
        elif fmt == "jsonl":
            docs = _iter_jsonl(p, stats, self.text_field, seek, start)
        elif fmt == "parquet":
            docs = _iter_parquet(p, self.text_field)
        else:
            docs = _iter_datasets(p, self.text_field)
        for n, doc in enumerate(docs):
            if self.max_documents is not None and n >= self.max_documents and seek is None:
                break
            if stop is not None and doc.index >= stop:
                break
            if doc.index >= start:
                yield doc

    def validate(self) -> int:
        """Read every document once, as a stream, so that a corpus that cannot be read (empty, binary,
        not UTF-8, a bad JSON line) fails before a model loads; returns the undecodable lines skipped."""
        stats = LineStats()
        n = sum(1 for _ in self.documents(stats=stats))
        check_read(self, stats, n)
        return stats.undecodable

    def sha256(self) -> str:
        return _sha256(self.path)

    def provenance(self) -> dict[str, Any]:
        return _read_provenance(self.path)


def open_corpus(
    path: str | Path,
    *,
    text_field: str = "text",
    max_documents: int | None = None,
    format: str | None = None,
) -> CorpusSource:
    """The corpus at ``path`` as a stream; raise ``CorpusError`` if it cannot be read as one."""
    p = Path(path).absolute()
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents must be at least 1, got {max_documents}")
    if not p.exists():
        raise CorpusError(f"{p}: corpus not found (no such file or directory)")
    fmt = format or _guess_format(p)
    if fmt not in FORMATS:
        raise CorpusError(f"{p}: unknown corpus format {fmt!r} (expected one of {', '.join(FORMATS)})")
    if p.is_dir() != (fmt == "datasets"):
        what = "a directory" if p.is_dir() else "a file"
        raise CorpusError(f"{p}: is {what}, which cannot be read as format {fmt!r}")
    return CorpusSource(p, fmt, text_field, max_documents)


def check_read(source: CorpusSource, stats: LineStats, documents: int) -> None:
    """After a whole read: raise for a corpus that is not UTF-8 or has no document; log skipped lines."""
    p = source.path
    if stats.undecodable and not stats.decoded:
        raise CorpusError(f"{p}: is not UTF-8 text (no line decodes as UTF-8)")
    if not documents:
        raise CorpusError(f"{p}: corpus is empty (no non-blank documents)")
    if stats.undecodable:
        logger.warning("%s: skipped %d line(s) that are not valid UTF-8", p, stats.undecodable)


def load_corpus(
    path: str | Path,
    *,
    text_field: str = "text",
    max_documents: int | None = None,
    format: str | None = None,
) -> Corpus:
    """Load the documents of the corpus at ``path``; raise ``CorpusError`` if it cannot be read."""
    source = open_corpus(path, text_field=text_field, max_documents=max_documents, format=format)
    stats = LineStats()
    documents = list(source.documents(stats=stats))
    check_read(source, stats, len(documents))
    return Corpus(
        documents=documents,
        source=source.source,
        format=source.format,
        sha256=source.sha256(),
        undecodable=stats.undecodable,
        provenance=source.provenance(),
    )


def _guess_format(p: Path) -> str:
    if p.is_dir():
        return "datasets"
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    return "text"


def _iter_lines(p: Path, stats: LineStats, seek: int | None = None, first_line: int = 0
                ) -> Iterator[tuple[int, int, str]]:
    """Yield (0-based line number, byte offset, text) of each non-blank line that is valid UTF-8;
    from byte ``seek`` (line ``first_line``) when given."""
    with p.open("rb") as f:
        if seek is None:
            if b"\0" in f.read(_SNIFF_BYTES):
                raise CorpusError(f"{p}: looks like a binary file (NUL byte in the first 64 KiB), not UTF-8 text")
            f.seek(0)
            first_line, at = 0, 0
        else:
            f.seek(seek)
            at = seek
        # Binary iteration splits on b"\n" only, so decoding per line lets one bad line be skipped
        # without losing the line numbering of the rest.
        for lineno, raw in enumerate(f, start=first_line):
            offset, at = at, at + len(raw)
            raw = raw.rstrip(b"\n").rstrip(b"\r")
            if lineno == 0 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                stats.undecodable += 1
                continue
            if not text.strip():
                continue
            stats.decoded += 1
            yield lineno, offset, text


def _iter_jsonl(p: Path, stats: LineStats, text_field: str, seek: int | None = None, first_line: int = 0
                ) -> Iterator[Document]:
    for lineno, offset, line in _iter_lines(p, stats, seek, first_line):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(
                f"{p}: line {lineno + 1} is not valid JSON ({e.msg}); expected one JSON object per line"
            ) from None
        if not isinstance(record, dict) or text_field not in record:
            raise CorpusError(f"{p}: line {lineno + 1} has no field {text_field!r}")
        value = record[text_field]
        if not isinstance(value, str):
            raise CorpusError(
                f"{p}: line {lineno + 1}: field {text_field!r} is not a string (got {type(value).__name__})"
            )
        if value.strip():
            yield Document(lineno, value, offset)


def _iter_parquet(p: Path, text_field: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(p)
    except (pa.ArrowException, OSError) as e:
        raise CorpusError(f"{p}: cannot read parquet file ({_one_line(e)})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise CorpusError(f"{p}: no column {text_field!r} (available columns: {', '.join(names) or 'none'})")
    col_type = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise CorpusError(f"{p}: column {text_field!r} is not a string column (type {col_type})")
    try:
        batches = pf.iter_batches(batch_size=_BATCH_ROWS, columns=[text_field])
        yield from _rows_to_documents(b.column(0).to_pylist() for b in batches)
    except (pa.ArrowException, OSError) as e:
        raise CorpusError(f"{p}: cannot read parquet file ({_one_line(e)})") from None


def _iter_datasets(p: Path, text_field: str) -> Iterator[Document]:
    import datasets  # heavy import; only needed for this format

    try:
        loaded = datasets.load_from_disk(str(p))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise CorpusError(
            f"{p}: is not a HuggingFace dataset saved with save_to_disk ({_one_line(e)})"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if "train" in loaded:
            loaded = loaded["train"]
        elif len(splits) == 1:
            loaded = loaded[splits[0]]
        else:
            raise CorpusError(f"{p}: dataset has no 'train' split and several others ({', '.join(splits)})")
    if text_field not in loaded.column_names:
        raise CorpusError(
            f"{p}: no column {text_field!r} (available columns: {', '.join(loaded.column_names) or 'none'})"
        )
    dtype = getattr(loaded.features[text_field], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise CorpusError(f"{p}: column {text_field!r} is not a string column (type {dtype})")
    batches = loaded.select_columns([text_field]).iter(batch_size=_BATCH_ROWS)
    yield from _rows_to_documents(batch[text_field] for batch in batches)


def _rows_to_documents(batches: Iterable[list[Any]]) -> Iterator[Document]:
    """Number rows across batches; null or blank rows are skipped but keep their row number."""
    row = 0
    for values in batches:
        for value in values:
            if isinstance(value, str) and value.strip():
                yield Document(row, value)
            row += 1


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            # The NUL separates name from content so ("ab", b"c") and ("a", b"bc") differ.
            h.update(f.relative_to(p).as_posix().encode() + b"\0")
            _hash_file(h, f)
    else:
        _hash_file(h, p)
    return h.hexdigest()


def _hash_file(h: Any, f: Path) -> None:
    with f.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)


def _read_provenance(p: Path) -> dict[str, Any]:
    sidecar = p.with_name(p.name + ".provenance.json")
    if not sidecar.is_file():
        return {}
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorpusError(f"{sidecar}: provenance file is not valid JSON ({_one_line(e)})") from None
    if not isinstance(data, dict):
        raise CorpusError(f"{sidecar}: provenance file must hold a JSON object")
    return data


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
