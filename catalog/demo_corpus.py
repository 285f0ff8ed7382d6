"""Build the demo English corpus offline from WordNet 3.0 (Debian package ``wordnet-base``).

Each synset gives its definition as one sentence and each quoted usage example as another, one
document per line. WordNet is used because it is installable from the distribution without
network access to a dataset hub, is freely licensed, and gives plain, varied English.

Usage: ``python -m catalog.demo_corpus OUT [--wordnet-dir DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")
DATA_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
# An example runs from one double quote to the next; a few WordNet glosses lose their closing
# quote at the end of the line, hence the ``$`` alternative.
_EXAMPLE = re.compile(r'"([^"]*)(?:"|$)')
# Examples start at the first '; "' (or ': "'); quotes before that belong to the definition ("as in "x"").
_EXAMPLES_START = re.compile(r'[;:]\s*"')


class WordNetMissingError(RuntimeError):
    """The WordNet data files are not installed."""


def parse_gloss(gloss: str) -> tuple[str, list[str]]:
    """Split a WordNet gloss into (definition sentence, example sentences without quotes)."""
    gloss = gloss.strip()
    if gloss.startswith('"'):
        definition, examples_part = "", gloss
    elif m := _EXAMPLES_START.search(gloss):
        definition, examples_part = gloss[: m.start()], gloss[m.start() + 1 :]
    else:
        definition, examples_part = gloss, ""
    definition = definition.strip().rstrip(";:,").strip()
    if definition:
        definition = definition[0].upper() + definition[1:]
        if definition[-1] not in ".?!":
            definition += "."
    # Attributions after a quote ("..."- Shakespeare) and stray text outside quotes are dropped.
    examples = [e.strip().rstrip(";,").strip() for e in _EXAMPLE.findall(examples_part)]
    return definition, [e for e in examples if e]


def iter_documents(wordnet_dir: Path) -> Iterator[str]:
    """Yield the corpus lines in a fixed order: noun, verb, adj, adv files, synsets in file order."""
    for name in DATA_FILES:
        with (wordnet_dir / name).open(encoding="utf-8") as f:
            for line in f:
                if line.startswith("  "):  # license header
                    continue
                _, sep, gloss = line.partition(" | ")
                if not sep:
                    continue
                definition, examples = parse_gloss(gloss)
                if definition:
                    yield definition
                yield from examples


def wordnet_package_version() -> str | None:
    try:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "wordnet-base"],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:  # no dpkg on this system
        return None
    if result.returncode != 0:  # not installed through dpkg (e.g. --wordnet-dir elsewhere)
        return None
    return result.stdout.strip() or None


def build_wordnet_corpus(out: Path, *, wordnet_dir: Path = DEFAULT_WORDNET_DIR) -> Path:
    """Write the corpus to ``out`` and ``<out>.provenance.json``; return ``out``."""
    files = [wordnet_dir / name for name in DATA_FILES]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise WordNetMissingError(
            f"WordNet data files not found ({', '.join(missing)}); "
            "install them with `apt-get install wordnet-base` or pass --wordnet-dir"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary name first so an interrupted build never leaves a truncated corpus.
    tmp = out.with_name(out.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8", newline="\n") as f:
        for doc in iter_documents(wordnet_dir):
            f.write(doc + "\n")
            n += 1
    os.replace(tmp, out)
    provenance: dict[str, Any] = {
        "source": "Debian package wordnet-base",
        "package_version": wordnet_package_version(),
        "files": [str(f) for f in files],
        "license": "WordNet 3.0 license (Princeton University)",
        "documents": n,
        "built_by": "catalog.demo_corpus",
    }
    out.with_name(out.name + ".provenance.json").write_text(
        json.dumps(provenance, indent=2) + "\n", encoding="utf-8"
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m catalog.demo_corpus", description="Build the demo English corpus from WordNet."
    )
    parser.add_argument("out", type=Path, help="output text file, one document per line")
    parser.add_argument("--wordnet-dir", type=Path, default=DEFAULT_WORDNET_DIR)
    args = parser.parse_args(argv)
    try:
        out = build_wordnet_corpus(args.out, wordnet_dir=args.wordnet_dir)
    except WordNetMissingError as e:
        parser.exit(1, f"error: {e}\n")
    n = json.loads(out.with_name(out.name + ".provenance.json").read_text(encoding="utf-8"))["documents"]
    print(f"wrote {n} documents to {out}")


if __name__ == "__main__":
    main()
