"""Tests for catalog.corpus (reading corpora) and catalog.demo_corpus (the WordNet demo corpus)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalog.corpus import CorpusError, Document, load_corpus, open_corpus
from catalog.demo_corpus import build_wordnet_corpus, parse_gloss


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def docs(corpus_docs: list[Document]) -> list[tuple[int, str]]:
    return [(d.index, d.text) for d in corpus_docs]


# --- plain text -----------------------------------------------------------------------------


def test_text_blank_lines_skipped_but_counted(tmp_path: Path) -> None:
    p = write(tmp_path / "c.txt", b"first\n\n   \nfourth line\n\t\nsixth")
    c = load_corpus(p)
    assert docs(c.documents) == [(0, "first"), (3, "fourth line"), (5, "sixth")]
    assert c.format == "text"
    assert c.source == str(p.absolute())
    assert c.undecodable == 0
    assert c.provenance == {}
    assert len(c.sha256) == 64


def test_text_crlf(tmp_path: Path) -> None:
    c = load_corpus(write(tmp_path / "c.txt", b"alpha\r\n\r\nbeta gamma\r\n"))
    assert docs(c.documents) == [(0, "alpha"), (2, "beta gamma")]


def test_text_utf8_bom_and_non_ascii(tmp_path: Path) -> None:
    c = load_corpus(write(tmp_path / "c.txt", "\ufeffcaf\u00e9\nna\u00efve \u2014 \u6f22\u5b57\n".encode()))
    assert docs(c.documents) == [(0, "caf\u00e9"), (1, "na\u00efve \u2014 \u6f22\u5b57")]


def test_max_documents(tmp_path: Path) -> None:
    p = write(tmp_path / "c.txt", b"a\n\nb\nc\nd\n")
    assert docs(load_corpus(p, max_documents=2).documents) == [(0, "a"), (2, "b")]
    assert len(load_corpus(p, max_documents=100).documents) == 4
    with pytest.raises(ValueError):
        load_corpus(p, max_documents=0)


def test_sha256_tracks_content(tmp_path: Path) -> None:
    p = write(tmp_path / "c.txt", b"one\ntwo\n")
    first = load_corpus(p).sha256
    assert load_corpus(p).sha256 == first
    write(p, b"one\ntwo!\n")
    assert load_corpus(p).sha256 != first


def test_provenance_sidecar(tmp_path: Path) -> None:
    p = write(tmp_path / "c.txt", b"hello\n")
    (tmp_path / "c.txt.provenance.json").write_text(json.dumps({"source": "unit test", "documents": 1}))
    assert load_corpus(p).provenance == {"source": "unit test", "documents": 1}


def test_bad_provenance_sidecar(tmp_path: Path) -> None:
    p = write(tmp_path / "c.txt", b"hello\n")
    (tmp_path / "c.txt.provenance.json").write_text("{not json")
    with pytest.raises(CorpusError, match="provenance"):
        load_corpus(p)


def test_some_undecodable_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = write(tmp_path / "c.txt", b"good one\ncaf\xe9 latin-1\n\ngood two\n\xff\xfe\nlast\n")
    with caplog.at_level(logging.WARNING, logger="catalog.corpus"):
        c = load_corpus(p)
    assert docs(c.documents) == [(0, "good one"), (3, "good two"), (5, "last")]
    assert c.undecodable == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2" in warnings[0].getMessage()


# --- JSONL ----------------------------------------------------------------------------------


def test_jsonl_custom_field(tmp_path: Path) -> None:
    lines = [
        json.dumps({"body": "first doc", "id": 1}),
        "",
        json.dumps({"body": "   ", "id": 2}),  # blank text: skipped, index still consumed
        json.dumps({"body": "fourth doc \u00e9", "id": 3}),
    ]
    p = write(tmp_path / "c.jsonl", ("\n".join(lines) + "\n").encode())
    c = load_corpus(p, text_field="body")
    assert c.format == "jsonl"
    assert docs(c.documents) == [(0, "first doc"), (3, "fourth doc \u00e9")]


def test_json_suffix_is_jsonl(tmp_path: Path) -> None:
    c = load_corpus(write(tmp_path / "c.json", b'{"text": "x"}\n{"text": "y"}\n'))
    assert c.format == "jsonl" and docs(c.documents) == [(0, "x"), (1, "y")]


def test_jsonl_undecodable_line(tmp_path: Path) -> None:
    c = load_corpus(write(tmp_path / "c.jsonl", b'{"text": "a"}\n{"text": "\xe9"}\n{"text": "c"}\n'))
    assert docs(c.documents) == [(0, "a"), (2, "c")]
    assert c.undecodable == 1


def test_jsonl_bad_json(tmp_path: Path) -> None:
    p = write(tmp_path / "c.jsonl", b'{"text": "ok"}\n\n{"text": broken\n')
    with pytest.raises(CorpusError, match=r"line 3 is not valid JSON") as e:
        load_corpus(p)
    assert str(p) in str(e.value)


def test_jsonl_missing_field(tmp_path: Path) -> None:
    p = write(tmp_path / "c.jsonl", b'{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(CorpusError, match=r"line 2 has no field 'text'"):
        load_corpus(p)


def test_jsonl_field_not_string(tmp_path: Path) -> None:
    p = write(tmp_path / "c.jsonl", b'{"text": 42}\n')
    with pytest.raises(CorpusError, match=r"line 1: field 'text' is not a string"):
        load_corpus(p)


def test_jsonl_line_not_object(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match=r"line 1 has no field 'text'"):
        load_corpus(write(tmp_path / "c.jsonl", b'["text"]\n'))


# --- Parquet --------------------------------------------------------------------------------


def test_parquet(tmp_path: Path) -> None:
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["zero", None, "", "three"], "n": [0, 1, 2, 3]}), p)
    c = load_corpus(p)
    assert c.format == "parquet"
    assert docs(c.documents) == [(0, "zero"), (3, "three")]
    assert docs(load_corpus(p, max_documents=1).documents) == [(0, "zero")]


def test_parquet_missing_column(tmp_path: Path) -> None:
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": ["x"], "id": [1]}), p)
    with pytest.raises(CorpusError, match=r"no column 'text' \(available columns: body, id\)"):
        load_corpus(p)


def test_parquet_non_string_column(tmp_path: Path) -> None:
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), p)
    with pytest.raises(CorpusError, match="not a string column"):
        load_corpus(p)


def test_parquet_unreadable(tmp_path: Path) -> None:
    p = write(tmp_path / "c.parquet", b"this is not parquet at all")
    with pytest.raises(CorpusError, match="cannot read parquet file"):
        load_corpus(p)


# --- datasets directory ---------------------------------------------------------------------


def test_datasets_directory(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    d = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": ["a b", "", "c d"], "label": [0, 1, 2]}).save_to_disk(str(d))
    (tmp_path / "ds.provenance.json").write_text('{"source": "from_dict"}')
    c = load_corpus(d)
    assert c.format == "datasets"
    assert docs(c.documents) == [(0, "a b"), (2, "c d")]
    assert c.provenance == {"source": "from_dict"}
    assert len(c.sha256) == 64


def test_datasets_dict_uses_train_split(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    d = tmp_path / "dd"
    datasets.DatasetDict(
        {
            "test": datasets.Dataset.from_dict({"body": ["held out"]}),
            "train": datasets.Dataset.from_dict({"body": ["t0", "t1"]}),
        }
    ).save_to_disk(str(d))
    assert docs(load_corpus(d, text_field="body").documents) == [(0, "t0"), (1, "t1")]


def test_datasets_missing_column(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    d = tmp_path / "ds"
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(d))
    with pytest.raises(CorpusError, match=r"no column 'text' \(available columns: body\)"):
        load_corpus(d)


def test_plain_directory_is_not_a_dataset(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello\n")
    with pytest.raises(CorpusError, match="not a HuggingFace dataset"):
        load_corpus(tmp_path)


# --- errors ---------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    p = tmp_path / "nope.txt"
    with pytest.raises(CorpusError, match="not found") as e:
        load_corpus(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("content", [b"", b"\n\n", b"   \n\t\r\n  "])
def test_empty_or_whitespace_only(tmp_path: Path, content: bytes) -> None:
    with pytest.raises(CorpusError, match="empty"):
        load_corpus(write(tmp_path / "c.txt", content))


def test_binary_file(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="binary"):
        load_corpus(write(tmp_path / "c.txt", b"PK\x03\x04\x00\x00some zip\nmore\n"))
    with pytest.raises(CorpusError, match="binary"):
        load_corpus(write(tmp_path / "c.jsonl", b'{"text": "a"}\n\x00\x01\n'))


def test_entirely_non_utf8(tmp_path: Path) -> None:
    latin1 = "caf\u00e9 cr\u00e8me\n\u00e0 la fa\u00e7on\n\nna\u00efve\n".encode("latin-1")
    with pytest.raises(CorpusError, match="not UTF-8"):
        load_corpus(write(tmp_path / "c.txt", latin1))


def test_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="unknown corpus format"):
        load_corpus(write(tmp_path / "c.txt", b"x\n"), format="csv")


def test_forced_format(tmp_path: Path) -> None:
    # A .txt file that actually holds JSONL can be read by naming the format.
    c = load_corpus(write(tmp_path / "c.txt", b'{"text": "x"}\n'), format="jsonl")
    assert c.format == "jsonl" and docs(c.documents) == [(0, "x")]


# --- WordNet demo corpus --------------------------------------------------------------------


def test_parse_gloss() -> None:
    assert parse_gloss('living things collectively; "the oceans are teeming with life"  \n') == (
        "Living things collectively.",
        ["the oceans are teeming with life"],
    )
    assert parse_gloss(
        'a notable achievement; "he performed a great feat"; "the book was her finest effort"'
    ) == (
        "A notable achievement.",
        ["he performed a great feat", "the book was her finest effort"],
    )
    # Quotes inside the definition stay there; an attribution after an example is dropped.
    assert parse_gloss('progress (as in "make strides"); "a quote"- Author') == (
        'Progress (as in "make strides").',
        ["a quote"],
    )
    # A '; ' inside a quoted example does not split it.
    assert parse_gloss('art; "tying is an art; untying is easy"')[1] == ["tying is an art; untying is easy"]


def test_build_wordnet_missing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="apt-get install wordnet-base"):
        build_wordnet_corpus(tmp_path / "out.txt", wordnet_dir=tmp_path / "no-wordnet")


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").exists(), reason="wordnet-base not installed")
def test_build_wordnet_corpus(tmp_path: Path) -> None:
    out = build_wordnet_corpus(tmp_path / "wordnet.txt")
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) > 100_000
    assert sum(len(line.split()) for line in lines) > 1_000_000
    assert all(line.strip() for line in lines)
    assert not any(line.startswith('"') and line.endswith('"') for line in lines)
    assert lines[0][0].isupper() and lines[0].endswith(".")
    assert "the oceans are teeming with life" in lines  # an example sentence, without its quotes
    prov = json.loads((tmp_path / "wordnet.txt.provenance.json").read_text())
    assert prov["documents"] == len(lines)
    assert prov["built_by"] == "catalog.demo_corpus"
    assert len(prov["files"]) == 4
    # The corpus loader reads it back with the provenance attached.
    c = load_corpus(out, max_documents=10)
    assert len(c.documents) == 10 and c.provenance["source"] == "Debian package wordnet-base"


@pytest.mark.parametrize("fmt", ["text", "jsonl"])
def test_a_range_read_from_its_byte_offset_equals_the_full_read(tmp_path: Path, fmt: str) -> None:
    """How a shard reads its documents: seek to the first one's line, read to the range's end."""
    texts = ["first line", "", "caf\u00e9 cr\u00e8me", "   ", "a\tb", "last one", "and more", "x"]
    path = tmp_path / ("c.txt" if fmt == "text" else "c.jsonl")
    lines = [t if fmt == "text" else json.dumps({"text": t}) for t in texts]
    raw = "\ufeff" + "\r\n".join(lines[:3]) + "\r\n" + "\n".join(lines[3:]) + "\n"
    path.write_bytes(raw.encode("utf-8").replace(b"a\tb", b"\xff\xfe bad" if fmt == "text" else b"a\\tb"))
    source = open_corpus(path)
    full = list(source.documents())
    assert [d.index for d in full] == ([0, 2, 5, 6, 7] if fmt == "text" else [0, 2, 4, 5, 6, 7])
    for i, first in enumerate(full):
        for stop in [d.index + 1 for d in full[i:]] + [None]:
            want = [d for d in full[i:] if stop is None or d.index < stop]
            assert list(source.documents(first.index, stop, offset=first.offset)) == want
