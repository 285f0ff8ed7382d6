"""The vocabulary (catalog/vocab.py) is the one home of every figure, label and kind.

Every figure column of ``neurons`` and ``layers`` is described there exactly once (ORM metadata and
the migrated database), and the read schemas, the export, the meanings and the label lists come
from it; the enums match what the database constrains.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter

import pytest
import tiny_models
from sqlalchemy import Float, Integer, String, create_engine, inspect, pool, text
from sqlalchemy.dialects.postgresql import DOUBLE_PRECISION

from catalog import vocab
from catalog.export import parquet_schema
from catalog.read import catalog as read_catalog
from catalog.read.schemas import STAT_MEANINGS, LayerInfo, NeuronStats
from catalog.report import data as report_data
from catalog.store import ingest, models
from catalog.store.models import Annotation, Layer, Neuron, Trigger, ValueToken

# Columns of the two tables that are not figures: keys, vectors and bookkeeping.
NEURON_NOT_FIGURES = {"run_id", "layer", "neuron", "key_vector", "value_vector", "up_vector"}
LAYER_NOT_FIGURES = {"run_id", "layer", "histograms"}
PY_TYPES = {Float: float, DOUBLE_PRECISION: float, Integer: int, String: str}


def _py_type(sql_type: object) -> type:
    return next(py for sql, py in PY_TYPES.items() if isinstance(sql_type, sql))


@pytest.mark.parametrize(("table", "not_figures", "figures"), [
    (Neuron.__table__, NEURON_NOT_FIGURES, vocab.NEURON_FIGURES),
    (Layer.__table__, LAYER_NOT_FIGURES, vocab.LAYER_FIGURES),
])
def test_every_figure_column_is_described_once(table, not_figures, figures) -> None:  # type: ignore[no-untyped-def]
    names = Counter(f.name for f in figures)
    assert [n for n, c in names.items() if c > 1] == []
    columns = {c.name: c for c in table.columns if c.name not in not_figures}
    assert set(names) == set(columns), "a column without a vocabulary entry, or an entry without a column"
    assert not_figures <= {c.name for c in table.columns}, "the exclusions name real columns"
    for f in figures:
        col = columns[f.name]
        assert (_py_type(col.type), col.nullable) == (f.type, f.nullable), f.name
        if f.type is str:
            assert col.type.length == 20
    for f in figures:
        assert f.meaning.strip() and f.meaning.endswith("."), f.name


def test_database_columns_match_the_vocabulary(migrated_db: str) -> None:
    """The migrations (not only the ORM) give every figure its column, type and nullability."""
    engine = create_engine(migrated_db, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            insp = inspect(conn)
            for table, not_figures, figures in (("neurons", NEURON_NOT_FIGURES, vocab.NEURON_FIGURES),
                                                ("layers", LAYER_NOT_FIGURES, vocab.LAYER_FIGURES)):
                cols = {c["name"]: c for c in insp.get_columns(table) if c["name"] not in not_figures}
                assert set(cols) == {f.name for f in figures}, table
                for f in figures:
                    assert (_py_type(cols[f.name]["type"]), cols[f.name]["nullable"]) == (f.type, f.nullable), f.name
            check = conn.scalar(text("SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                                     "WHERE conname = 'ck_annotations_label'"))
    finally:
        engine.dispose()
    # the annotators' labels the database accepts are exactly HumanLabel's
    assert check is not None
    assert set(re.findall(r"'([^']*)'::", check)) == set(vocab.HUMAN_LABELS)


def test_stat_lists_and_meanings_come_from_the_vocabulary() -> None:
    numeric = [f for f in vocab.NEURON_FIGURES if f.numeric]
    assert models.NEURON_STATS == vocab.NEURON_STATS == tuple(f.name for f in numeric)
    assert STAT_MEANINGS == {f.name: f.meaning for f in numeric}
    assert vocab.NEURON_FIELDS == (*vocab.NEURON_STATS, "suggested_label")
    assert read_catalog.NEURON_FIELDS == vocab.NEURON_FIELDS
    assert read_catalog.LAYER_FIELDS == vocab.LAYER_STATS
    # one btree per statistic: search filters and sorts
    indexed = {i.name for i in Neuron.__table__.indexes}
    assert {f"ix_neurons_run_{s}" for s in vocab.NEURON_STATS} <= indexed


def test_read_schemas_come_from_the_vocabulary() -> None:
    fields = NeuronStats.model_fields
    assert tuple(fields) == vocab.NEURON_FIELDS
    for f in vocab.NEURON_FIGURES:
        assert fields[f.name].description == f.meaning
        assert fields[f.name].annotation == (f.type | None)
        assert fields[f.name].default is None
    layer = LayerInfo.model_fields
    assert tuple(layer) == ("layer", *vocab.LAYER_STATS, "label_counts", "histograms")
    for f in vocab.LAYER_FIGURES:
        assert (layer[f.name].description, layer[f.name].annotation) == (f.meaning, f.type | None)


def test_export_fields_come_from_the_vocabulary() -> None:
    import pyarrow as pa

    schema = parquet_schema(vectors=False)
    names = schema.names
    figures = names[names.index("neuron") + 1 : names.index("agreement_triggers")]
    assert tuple(figures) == vocab.NEURON_FIELDS
    for f in vocab.NEURON_FIGURES:  # numeric figures are float64 in Parquet (label_triggers too, as always)
        assert schema.field(f.name).type == (pa.string() if f.type is str else pa.float64())


def test_labels_and_kinds() -> None:
    assert models.LABELS == vocab.LABELS == ("shallow", "semantic", "shallow+semantic")
    assert models.HUMAN_LABELS == vocab.HUMAN_LABELS == (*vocab.LABELS, "none")
    assert models.PROJECTIONS == vocab.PROJECTIONS == ("raw", "folded")
    assert sorted(vocab.LABEL_SCALE) == sorted(vocab.SuggestedLabel)
    assert report_data.SUGGESTED_LABELS == ("shallow", "shallow+semantic", "semantic")
    assert report_data.HUMAN_LABELS == (*report_data.SUGGESTED_LABELS, "none")
    assert all(type(x) is str for x in (*vocab.LABELS, *vocab.HUMAN_LABELS, *report_data.HUMAN_LABELS))
    # the places that give each label a colour or a key have one for every label
    from catalog.extract.labels import CODES
    from catalog.report.figures import LABEL_COLOURS
    from catalog.ui.pages import LABEL_KEYS
    from catalog.ui.plots import LABEL_COLOURS as UI_COLOURS

    assert set(CODES) == set(vocab.LABELS)
    assert set(vocab.HUMAN_LABELS) == set(LABEL_KEYS) == set(UI_COLOURS) <= set(LABEL_COLOURS)
    # the ORM's CHECK of annotators' labels is built from the enum (the migrated one is checked above)
    (check,) = [c for c in Annotation.__table__.constraints if c.name == "ck_annotations_label"]
    assert set(re.findall(r"'([^']*)'", str(check.sqltext))) == set(vocab.HUMAN_LABELS)
    # each ablation kind has its neuron figure, layer figure and trigger column, and nothing else does
    assert {n for n in vocab.NEURON_FIELDS if n.startswith("ablation_")} == {f"ablation_{k}" for k in vocab.Ablation}
    assert {n for n in vocab.LAYER_STATS if n.startswith("mean_ablation_")} == {
        f"mean_ablation_{k}" for k in vocab.Ablation}
    assert {c.name for c in Trigger.__table__.columns if c.name.startswith("coefficient_without_")} == {
        f"coefficient_without_{k}" for k in vocab.Ablation}
    assert set(ingest.TRIGGER_COLUMNS) == {c.name for c in Trigger.__table__.columns} - {"run_id", "layer"}
    assert set(ingest.VALUE_TOKEN_COLUMNS) == {c.name for c in ValueToken.__table__.columns} - {"run_id", "layer"}
    # the partial indexes of value tokens name one projection and one kind each, from the enums
    for index in ValueToken.__table__.indexes:
        where = str(index.dialect_options["postgresql"]["where"])
        assert re.findall(r"convention = '(\w+)'", where)[0] in vocab.PROJECTIONS
        assert re.findall(r"kind = '(\w+)'", where)[0] in set(vocab.ValueTokenKind)
    assert [int(s) for s in vocab.TriggerSign] == [1, -1]


def test_vocab_and_writer_import_neither_torch_nor_the_pipeline() -> None:
    code = ("import sys; import catalog.vocab; assert 'torch' not in sys.modules and 'sqlalchemy' not in sys.modules; "
            "import catalog.store.ingest; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('catalog.extract')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_writer_refuses_unknown_and_missing_columns() -> None:
    writer = ingest.RunWriter(None, 1)  # the checks come before any SQL
    with pytest.raises(ValueError, match="unknown columns.*key_nrom"):
        writer._neurons(0, {"key_vector": [[0.0]], "value_vector": [[0.0]], "key_nrom": [1.0]})
    with pytest.raises(ValueError, match="missing columns.*logit"):
        writer._copy_table("value_tokens", 0, {"neuron": [0]}, ingest.VALUE_TOKEN_COLUMNS)
    with pytest.raises(ValueError, match="unknown columns"):
        writer._layer_row(0, {"mean_alignmnet": 0.0})


def test_columns_of_a_weight_only_layer() -> None:
    """catalog.extract.columns gives the writer every vocabulary figure, null where a run has none."""
    from catalog.extract.architectures import MlpView
    from catalog.extract.columns import layer_columns
    from catalog.extract.pipeline import Parameters, layer_records

    view = MlpView.of(tiny_models.build("llama"))
    rec = next(layer_records(view, Parameters()))
    cols = layer_columns(rec)
    assert set(cols) == {"layer", "row", "neurons", "value_tokens", "triggers"}
    neurons = cols["neurons"]
    assert set(neurons) == {*vocab.NEURON_FIELDS, *ingest.NEURON_VECTORS}
    by_group = {g: [f.name for f in vocab.NEURON_FIGURES if f.group == g] for g in vocab.Group}
    # a gated model without biases: every weight figure but bias; no corpus figure in a weight-only run
    assert [n for n in by_group[vocab.Group.weights] if neurons[n] is None] == ["bias"]
    assert neurons["up_vector"] is not None
    assert all(neurons[n] is None for g, names in by_group.items() if g != vocab.Group.weights for n in names)
    assert set(cols["row"]) <= set(ingest.LAYER_ROW)
    assert cols["triggers"] is None
    assert set(cols["value_tokens"]) == set(ingest.VALUE_TOKEN_COLUMNS)
    assert set(cols["value_tokens"]["convention"]) <= set(vocab.PROJECTIONS)
