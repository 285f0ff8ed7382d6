"""Export of annotations with every revision (JSONL or CSV, one row per revision) and import of such a file.

An import is one transaction: it adds what the database lacks, accepts what it already holds
unchanged, and on any conflict (the same revision with other content, a gap in the revisions, an
unknown model) fails whole with a message naming the line, so nothing is half imported. Imported
annotators get no token: `neuron-catalog users add NAME` gives them one.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import exists, select
from sqlalchemy.orm import Session, aliased

from catalog.read.errors import InvalidParameter, NotFound
from catalog.store.models import HUMAN_LABELS, Annotation, AnnotationRevision, Annotator, CatalogModel

FIELDS = ("model", "layer", "neuron", "annotator", "revision", "label", "description", "examples", "run_id",
          "weights_sha256", "created_at")


class ImportError_(InvalidParameter):
    """The file cannot be imported; nothing was written."""


@dataclass
class ImportReport:
    annotations_created: int = 0
    revisions_added: int = 0
    revisions_present: int = 0
    annotators_created: int = 0


def rows(session: Session, model: str | None = None, *, visible_to: int | None = None) -> Iterator[dict[str, Any]]:
    """Every revision of every annotation (of ``model``, or of all models), in a stable order; with
    ``visible_to`` (an annotator id) only those of the neurons that annotator has annotated (blind first
    labelling: what they may read)."""
    stmt = (
        select(CatalogModel.name, Annotation.layer, Annotation.neuron, Annotator.name, AnnotationRevision)
        .join(Annotation, Annotation.id == AnnotationRevision.annotation_id)
        .join(CatalogModel, CatalogModel.id == Annotation.model_id)
        .join(Annotator, Annotator.id == Annotation.annotator_id)
        .order_by(CatalogModel.name, Annotation.layer, Annotation.neuron, Annotator.name, AnnotationRevision.revision)
    )
    if visible_to is not None:
        own = aliased(Annotation)
        stmt = stmt.where(exists().where(own.model_id == Annotation.model_id, own.layer == Annotation.layer,
                                         own.neuron == Annotation.neuron, own.annotator_id == visible_to))
    if model is not None:
        if session.scalar(select(CatalogModel.id).where(CatalogModel.name == model)) is None:
            raise NotFound(f"no catalog named {model!r}")
        stmt = stmt.where(CatalogModel.name == model)
    for name, layer, neuron, who, r in session.execute(stmt).tuples():
        yield {"model": name, "layer": layer, "neuron": neuron, "annotator": who, "revision": r.revision,
               "label": r.label, "description": r.description, "examples": r.examples, "run_id": r.run_id,
               "weights_sha256": r.weights_sha256, "created_at": r.created_at.isoformat()}


def to_jsonl(items: Iterable[dict[str, Any]]) -> Iterator[str]:
    for item in items:
        yield json.dumps(item, ensure_ascii=False) + "\n"


def to_csv(items: Iterable[dict[str, Any]]) -> Iterator[str]:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS)
    writer.writeheader()
    for item in items:
        writer.writerow({**item, "examples": json.dumps(item["examples"])})
        yield buf.getvalue()
        buf.seek(0)
        buf.truncate()
    yield buf.getvalue()


def export(session: Session, out: Path, model: str | None = None) -> int:
    """Write the revisions to ``out`` (.jsonl or .csv); returns how many rows."""
    suffix = out.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise InvalidParameter(f"{out}: give a .jsonl or .csv file")
    count = 0

    def counted() -> Iterator[dict[str, Any]]:
        nonlocal count
        for item in rows(session, model):
            count += 1
            yield item

    with out.open("w", encoding="utf-8", newline="") as f:
        for chunk in (to_jsonl if suffix == ".jsonl" else to_csv)(counted()):
            f.write(chunk)
    return count


def _parse(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise ImportError_(f"{path}: give a .jsonl or .csv file (as written by `annotations export`)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ImportError_(f"{path}: cannot read it as UTF-8 text ({exc.__class__.__name__})") from exc
    items: list[dict[str, Any]] = []
    if suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ImportError_(f"{path}:{number}: not JSON ({exc.msg})") from exc
                if not isinstance(item, dict):
                    raise ImportError_(f"{path}:{number}: a line must be a JSON object")
                items.append({**item, "_line": number})
    else:
        reader = csv.DictReader(io.StringIO(text))
        missing = set(FIELDS) - set(reader.fieldnames or ())
        if missing:
            raise ImportError_(f"{path}: CSV lacks the columns {', '.join(sorted(missing))}")
        for number, item in enumerate(reader, 2):
            try:
                examples = json.loads(item["examples"] or "[]")
                conv: dict[str, Any] = {
                    **item, "layer": int(item["layer"]), "neuron": int(item["neuron"]),
                    "revision": int(item["revision"]), "examples": examples,
                    "run_id": int(item["run_id"]) if item["run_id"] else None,
                    "weights_sha256": item["weights_sha256"] or None, "_line": number,
                }
            except (ValueError, json.JSONDecodeError) as exc:
                raise ImportError_(f"{path}:{number}: {exc}") from exc
            items.append(conv)
    if not items:
        raise ImportError_(f"{path}: no annotation rows in the file")
    return items


def _check(path: Path, item: dict[str, Any]) -> None:
    where = f"{path}:{item['_line']}"
    for key in ("model", "annotator", "label"):
        if not isinstance(item.get(key), str) or not item[key]:
            raise ImportError_(f"{where}: {key} missing")
    for key in ("layer", "neuron", "revision"):
        if not isinstance(item.get(key), int) or item[key] < (1 if key == "revision" else 0):
            raise ImportError_(f"{where}: {key} must be a {'positive' if key == 'revision' else 'non-negative'} integer")
    if item["label"] not in HUMAN_LABELS:
        raise ImportError_(f"{where}: unknown label {item['label']!r}; one of {', '.join(HUMAN_LABELS)}")
    if not isinstance(item.get("description", ""), str):
        raise ImportError_(f"{where}: description must be text")
    ex = item.get("examples", [])
    if not isinstance(ex, list) or not all(
        isinstance(e, dict) and set(e) == {"document", "position"} and all(isinstance(v, int) for v in e.values())
        for e in ex
    ):
        raise ImportError_(f"{where}: examples must be a list of {{document, position}}")


def import_file(session: Session, path: Path) -> ImportReport:
    """Add the file's revisions; raise ImportError_ (and write nothing: the caller rolls back) on conflict."""
    items = _parse(path)
    for item in items:
        _check(path, item)
    report = ImportReport()
    models = dict(session.execute(select(CatalogModel.name, CatalogModel)).tuples().all())
    people = {a.name: a for a in session.scalars(select(Annotator))}
    items.sort(key=lambda i: (i["model"], i["layer"], i["neuron"], i["annotator"], i["revision"]))
    for item in items:
        where = f"{path}:{item['_line']}"
        entry = models.get(item["model"])
        if entry is None:
            raise ImportError_(f"{where}: no catalog named {item['model']!r} here (extract it first)")
        if not (item["layer"] < entry.n_layers and item["neuron"] < entry.d_mlp):
            raise ImportError_(f"{where}: catalog {entry.name!r} has no neuron {item['layer']}/{item['neuron']}")
        who = people.get(item["annotator"])
        if who is None:
            who = people[item["annotator"]] = Annotator(name=item["annotator"][:100])
            session.add(who)
            session.flush()
            report.annotators_created += 1
        ann = session.scalar(
            select(Annotation).where(Annotation.model_id == entry.id, Annotation.layer == item["layer"],
                                     Annotation.neuron == item["neuron"], Annotation.annotator_id == who.id)
            .with_for_update()
        )
        fields = {"label": item["label"], "description": item.get("description", "") or "",
                  "examples": item.get("examples", []), "run_id": item.get("run_id"),
                  "weights_sha256": item.get("weights_sha256")}
        created_at = _time(where, item.get("created_at"))
        rev = item["revision"]
        if ann is None:
            if rev != 1:
                raise ImportError_(f"{where}: revision {rev} without revision 1 before it")
            ann = Annotation(model_id=entry.id, layer=item["layer"], neuron=item["neuron"], annotator_id=who.id,
                             revision=1, created_at=created_at, updated_at=created_at, **fields)
            session.add(ann)
            session.flush()
            report.annotations_created += 1
        elif rev <= ann.revision:
            held = session.get_one(AnnotationRevision, (ann.id, rev))
            same = (held.label, held.description, held.examples) == (fields["label"], fields["description"],
                                                                     fields["examples"])
            if not same:
                raise ImportError_(f"{where}: revision {rev} of {item['annotator']}'s annotation of "
                                   f"{item['layer']}/{item['neuron']} differs from the one in the catalog")
            report.revisions_present += 1
            continue
        elif rev != ann.revision + 1:
            raise ImportError_(f"{where}: revision {rev} follows revision {ann.revision} (a gap)")
        else:
            ann.revision, ann.updated_at = rev, created_at
            for k, v in fields.items():
                setattr(ann, k, v)
        session.add(AnnotationRevision(annotation_id=ann.id, revision=rev, created_at=created_at, **fields))
        session.flush()
        report.revisions_added += 1
    return report


def _time(where: str, value: Any) -> datetime:
    if value is None:
        return datetime.now().astimezone()
    try:
        return datetime.fromisoformat(str(value))
    except ValueError as exc:
        raise ImportError_(f"{where}: created_at {value!r} is not an ISO date and time") from exc
