"""The ``neuron-catalog`` command: thin wrappers around catalog.runs, catalog.read, catalog.export,
the API server and migrations.

Every known failure (bad model path, unsupported architecture, bad corpus, unreachable database,
bad export target) is reported as one ``error:`` line on stderr with exit status 1.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, ClassVar

import typer

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Catalog what each FFN neuron of a transformer language model stores (Geva et al. 2021).",
)
db_app = typer.Typer(no_args_is_help=True, help="Database schema migrations (Alembic).")
app.add_typer(db_app, name="db")
users_app = typer.Typer(no_args_is_help=True, help="Annotators: who may write annotations (tokens are stored hashed).")
app.add_typer(users_app, name="users")
annotations_app = typer.Typer(no_args_is_help=True, help="Annotations: export, import, agreement.")
app.add_typer(annotations_app, name="annotations")


def _known_errors() -> tuple[type[BaseException], ...]:
    from catalog.corpus import CorpusError
    from catalog.export import ExportError
    from catalog.read.errors import ReadError
    from catalog.report import ReportError
    from catalog.runs.lifecycle import RunStateError
    from catalog.store.database import DatabaseUnavailable
    from catalog.store.migrate import SchemaMismatch

    known: list[type[BaseException]] = [CorpusError, ExportError, DatabaseUnavailable, ReadError, ReportError,
                                         RunStateError, SchemaMismatch]
    # Model errors come from modules that import torch; when they were never imported they cannot
    # have been raised, and read-only commands stay quick.
    if "catalog.loading" in sys.modules:
        known.append(sys.modules["catalog.loading"].ModelSourceError)
    if "catalog.extract.architectures" in sys.modules:
        known.append(sys.modules["catalog.extract.architectures"].UnsupportedArchitecture)
    if "catalog.extract.windows" in sys.modules:
        known.append(sys.modules["catalog.extract.windows"].BosError)
    return tuple(known)


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _run(fn: Any) -> Any:
    try:
        return fn()
    except _known_errors() as exc:
        _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except KeyboardInterrupt:
        _fail("interrupted; the previous catalog is unchanged (an extraction stops resumable: `neuron-catalog runs resume ID`)", 130)


class _Bars:
    """One tqdm bar per stage, created when the stage reports first."""

    UNITS: ClassVar[dict[str, str]] = {"plan": "doc", "merge": "layer", "weights": "layer", "similar": "space", "ablation": "prefix",
                                         "labels": "layer"}

    def __init__(self) -> None:
        from tqdm import tqdm

        self.tqdm = tqdm
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        bar = self.bars.get(stage)
        if bar is None:
            for other in self.bars.values():
                other.close()
            unit = next((u for k, u in self.UNITS.items() if stage.startswith(k)), "tok")
            bar = self.bars[stage] = self.tqdm(total=total or None, desc=stage, unit=unit, unit_scale=unit == "tok",
                                               file=sys.stderr, dynamic_ncols=True)
        bar.update(done)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers
    except ImportError:  # an install without the `extract` extra (the torch-free API image)
        _fail("extract needs torch and transformers, which are not installed: pip install 'neuron-catalog[extract]'")

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@app.command()
def extract(
    model: Annotated[str, typer.Option(help="Hub id, local model directory or .gguf file; 'smollm2' is the packaged SmolLM2-135M-Instruct, 'minilm' the packaged encoder all-MiniLM-L6-v2.")] = "smollm2",
    name: Annotated[str | None, typer.Option(help="Catalog entry name (default: from the model id, directory or file name). Extracting the same name again replaces its catalog.")] = None,
    corpus: Annotated[Path | None, typer.Option(help="Corpus for trigger prefixes: text (one document per line), .jsonl, .parquet or a `datasets` directory. Without it only weight-derived figures are stored.")] = None,
    text_field: Annotated[str, typer.Option(help="Field holding the text in JSONL/Parquet/datasets corpora.")] = "text",
    max_tokens: Annotated[int | None, typer.Option(min=1, help="Stop reading the corpus after this many tokens.")] = None,
    max_documents: Annotated[int | None, typer.Option(min=1, help="Read at most this many documents.")] = None,
    top_n: Annotated[int, typer.Option(min=1, max=1000, help="Trigger examples kept per neuron (and per sign for gated models).")] = 50,
    window: Annotated[int, typer.Option(min=2, help="Context window in tokens (BOS, or an encoder's CLS and SEP, included); longer documents are split.")] = 256,
    batch_tokens: Annotated[int, typer.Option(min=64, help="Tokens per forward batch (padding included).")] = 4096,
    seed: Annotated[int, typer.Option(help="Seed of the random-token ablation, the shuffled-value baseline and the label bootstrap.")] = 0,
    bos: Annotated[str, typer.Option(help="Token read before every window: 'auto' (the tokenizer's BOS when it adds one; <|endoftext|> when it says it adds none, e.g. SmolLM2-Instruct, whose GGUF names the chat header <|im_start|> as BOS), 'none', or a token's exact text. Recorded on the run.")] = "auto",
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: CUDA when present).")] = None,
    distributed: Annotated[bool, typer.Option("--distributed", help="Queue the extraction for the Celery workers (`neuron-catalog worker`, broker CATALOG_BROKER_URL) instead of running it here, and follow it until it is published; Ctrl-C stops following only. Model and corpus paths are read on the worker.")] = False,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="With --distributed: print the request id and return once it is queued.")] = False,
    shard_tokens: Annotated[int | None, typer.Option(min=1, help="Corpus tokens per shard (whole documents; default CATALOG_SHARD_TOKENS, 100000). A killed run resumes from its finished shards (`neuron-catalog runs resume ID`).")] = None,
) -> None:
    """Extract a model's neuron catalog into Postgres (and, with --corpus, its trigger prefixes)."""
    if no_wait and not distributed:
        _fail("--no-wait needs --distributed")
    _quiet_transformers()
    from catalog.runs.local import extract as run_extract
    from catalog.runs.schemas import ExtractRequest, default_parameters

    params = default_parameters(top_n=top_n, window=window, batch_tokens=batch_tokens, ablation_seed=seed, bos=bos)
    req = ExtractRequest(
        model=model, name=name, corpus=str(corpus) if corpus is not None else None, text_field=text_field,
        max_tokens=max_tokens, max_documents=max_documents, device=device, params=params, shard_tokens=shard_tokens,
    )
    if distributed:
        _extract_distributed(req, wait=not no_wait)
        return
    bars = _Bars()
    try:
        summary = _run(lambda: run_extract(req, progress=bars, log=lambda m: typer.echo(m, err=True)))
    finally:
        bars.close()
    _summary_lines(summary.name, summary.n_layers, summary.d_mlp, summary.run_id, summary.timings)


def _summary_lines(name: str, n_layers: int, d_mlp: int, run_id: int, timings: dict[str, float]) -> None:
    typer.echo(
        f"catalog {name!r}: {n_layers} layers x {d_mlp} neurons (run {run_id}); "
        + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
    )
    typer.echo(f"  export it: neuron-catalog export --model {name} --out {name}.jsonl")
    typer.echo(f"  look at one neuron: neuron-catalog show --model {name} --layer 0 --neuron 0")


def _extract_distributed(req: Any, *, wait: bool) -> None:
    """Queue ``req`` as an extraction request, send its task, and (``wait``) follow it to the end."""
    from dataclasses import asdict

    from sqlalchemy.exc import SQLAlchemyError

    from catalog import requests
    from catalog.store import migrate
    from catalog.store.database import check_connection
    from workers.tasks import BrokerUnavailable, send_request

    def submit() -> int:
        check_connection()
        migrate.require_head(None, who="extract")  # `db upgrade` (or `serve`) migrates; extraction never does
        return requests.create(asdict(req))

    request_id = _run(submit)
    try:
        send_request(request_id)
    except BrokerUnavailable as exc:
        message = str(exc)
        _run(lambda: requests.mark_failed(request_id, f"not sent: {message}"))
        _fail(message)
    if not wait:
        typer.echo(f"request {request_id} queued; follow it with `neuron-catalog runs`", err=True)
        typer.echo(request_id)
        return
    last: list[Any] = []

    def show(v: requests.RequestView) -> None:
        last[:] = [v]
        if v.status != "failed":
            typer.echo(v.describe(), err=True)

    lost: tuple[type[BaseException], ...] = (SQLAlchemyError, LookupError, *_known_errors())
    try:
        final = requests.follow(request_id, show, until_planned=True)
    except KeyboardInterrupt:
        typer.echo(f"stopped following; the extraction goes on as request {request_id} "
                   "(see `neuron-catalog runs`)", err=True)
        raise typer.Exit(130) from None
    except lost as exc:
        _fail(f"lost the database while following request {request_id} (the extraction goes on): "
              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    if final.run_id is not None:  # planned: the run says how it ends (its request follows it)
        _follow_run(final.run_id)
        return
    _fail(f"request {request_id} {final.status}: {final.error}" if final.error else f"request {request_id} {final.status}")


def _follow_run(run_id: int) -> None:
    """Follow a queue-driven run to its end with a live bar fed by its rows (shards done, tokens/s,
    ETA, who holds what); print the in-process summary once published, else fail with its error."""
    from sqlalchemy.exc import SQLAlchemyError
    from tqdm import tqdm

    from catalog.runs import views

    bar = tqdm(total=0, unit="tok", file=sys.stderr, dynamic_ncols=True, leave=False)
    what: list[str] = [""]

    def show(v: views.RunView) -> None:
        label, done, total, detail = views.bar_figures(v)
        if label != what[0]:
            what[0] = label
            bar.reset(total=total)
            bar.unit = "tok" if label == "corpus pass" else "shard"
            bar.set_description(f"run {run_id} {label}")
        bar.total = total
        bar.n = done
        bar.set_postfix_str(detail, refresh=False)
        bar.refresh()

    lost: tuple[type[BaseException], ...] = (SQLAlchemyError, LookupError, *_known_errors())
    try:
        final = views.follow_run(run_id, show)
    except KeyboardInterrupt:
        bar.close()
        typer.echo(f"stopped following; run {run_id} goes on on the workers (`neuron-catalog runs show {run_id}`)",
                   err=True)
        raise typer.Exit(130) from None
    except lost as exc:
        bar.close()
        _fail(f"lost the database while following run {run_id} (the extraction goes on): "
              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    bar.close()
    if final.status not in ("complete", "superseded"):
        _fail(f"run {run_id} {final.status}: {final.error}" if final.error else f"run {run_id} {final.status}")
    done = _run(lambda: _published_run(run_id))
    _summary_lines(*done)


def _published_run(run_id: int) -> tuple[str, int, int, int, dict[str, float]]:
    """The summary of a published queue-driven run: from its request's result, which keeps the
    timings in stage order (a JSONB object does not), else from the run row."""
    from sqlalchemy import select

    from catalog import requests
    from catalog.store.database import session_scope
    from catalog.store.models import CatalogModel, ExtractionRequest, ExtractionRun

    with session_scope() as s:
        request_id = s.scalar(select(ExtractionRequest.id).where(ExtractionRequest.run_id == run_id,
                                                                 ExtractionRequest.status == "published"))
    done = None if request_id is None else requests.published(request_id)
    if done is not None:
        return done.name, done.n_layers, done.d_mlp, done.run_id, done.timings
    with session_scope() as s:
        name, n_layers, d_mlp, timings = s.execute(
            select(CatalogModel.name, CatalogModel.n_layers, CatalogModel.d_mlp, ExtractionRun.timings)
            .join(ExtractionRun, ExtractionRun.model_id == CatalogModel.id).where(ExtractionRun.id == run_id)).one()
    return name, n_layers, d_mlp, run_id, {k: float(v) for k, v in (timings or {}).items() if k != "total"}


@app.command("export")
def export_cmd(
    model: Annotated[str, typer.Option(help="Catalog entry name (as given to or derived by `extract`).")],
    out: Annotated[Path, typer.Option(help="Output file: .jsonl or .parquet.")],
    vectors: Annotated[bool, typer.Option(help="Also write key and value vectors.")] = False,
) -> None:
    """Write a catalog out as one record per neuron (JSONL or Parquet)."""
    from catalog.export import export
    from catalog.store.database import check_connection, session_scope

    def go() -> int:
        check_connection()
        with session_scope() as s:
            return export(s, model, out, vectors=vectors)

    count = _run(go)
    typer.echo(f"wrote {count} neuron records to {out}")


# `layers` table: (field, title, width, decimals or None for integers)
LAYER_COLUMNS = (
    ("layer", "layer", 5, None), ("mean_alignment", "align", 7, 3), ("key_cosine_mean", "key cos", 7, 3),
    ("value_cosine_mean", "val cos", 7, 3), ("mean_agreement", "agree", 6, 3),
    ("mean_ablation_last", "dLast", 6, 2), ("mean_ablation_first", "dFirst", 6, 2),
    ("mean_ablation_random", "dRandom", 7, 2), ("labels_shallow", "shallow", 7, None),
    ("labels_semantic", "semantic", 8, None), ("labels_shallow+semantic", "both", 5, None),
)


@app.command()
def layers(
    model: Annotated[str, typer.Option(help="Catalog entry name.")],
    out: Annotated[Path | None, typer.Option(help="Write the rows to a .jsonl (histograms included) or .csv file instead of printing a table.")] = None,
) -> None:
    """Per-layer figures: seed 000 weight statistics, mean agreement and ablation changes, label counts."""
    from catalog.export import export_layers, flat_layer_rows
    from catalog.store.database import check_connection, session_scope

    def go() -> Any:
        check_connection()
        with session_scope() as s:
            return export_layers(s, model, out) if out is not None else flat_layer_rows(s, model)

    result = _run(go)
    if out is not None:
        typer.echo(f"wrote {result} layer rows to {out}")
        return
    typer.echo(" ".join(f"{title:>{width}}" for _, title, width, _ in LAYER_COLUMNS))
    for row in result:
        typer.echo(" ".join(
            f"{'-':>{width}}" if row[key] is None else f"{row[key]:>{width}.{dec}f}" if dec is not None else f"{row[key]:>{width}}"
            for key, _, width, dec in LAYER_COLUMNS
        ))


@app.command()
def show(
    model: Annotated[str, typer.Option(help="Catalog entry name.")],
    layer: Annotated[int, typer.Option(min=0, help="0-based layer.")],
    neuron: Annotated[int, typer.Option(min=0, help="0-based neuron.")],
    triggers: Annotated[int, typer.Option(min=0, help="How many trigger prefixes to print.")] = 5,
) -> None:
    """Print one neuron's record: weights, value tokens, triggers, agreement and ablation."""
    from catalog.read.catalog import records
    from catalog.store.database import check_connection, session_scope

    def go() -> dict[str, Any] | None:
        check_connection()
        with session_scope() as s:
            for rec in records(s, model, layers=[layer], neurons=[neuron]):
                return rec
        return None

    rec = _run(go)
    if rec is None:
        _fail(f"catalog {model!r} has no neuron {layer}/{neuron}")
    assert rec is not None
    skip = {"value_top_tokens", "value_bottom_tokens", "triggers", "negative_triggers"}
    for k, v in rec.items():
        if k not in skip:
            typer.echo(f"{k:>30}: {v}")
    typer.echo(f"{'value top tokens':>30}: " + " ".join(repr(t["token"]) for t in rec["value_top_tokens"][:15]))
    for t in rec["triggers"][:triggers]:
        typer.echo(f"{t['activation']:>30.3f}: {t['text']!r} -> {t['next_token']!r}")


@app.command()
def report(
    model: Annotated[str, typer.Option(help="Catalog entry name.")],
    out: Annotated[Path | None, typer.Option(help="Output directory (default: docs/findings/<model name>).")] = None,
) -> None:
    """Write the findings report: index.html with PNG figures testing seed 000 and seed 001, and figures.json."""
    from catalog.report.html import write_report

    def go() -> Any:
        with _schema_session() as s:
            return write_report(s, model, out)

    summary = _run(go)
    typer.echo(f"wrote {len(summary.drawn)} figures to {summary.out / 'index.html'}")
    for key, note in summary.notes.items():
        typer.echo(f"  {key}: {note}")


runs_app = typer.Typer(help="Extraction runs: list them, show one, resume an interrupted one, cancel one.")
app.add_typer(runs_app, name="runs")


def _runs_session() -> Any:
    """A session on a database with a schema; runs whose process died are marked interrupted first."""
    from catalog.read.catalog import NO_SCHEMA
    from catalog.read.errors import CatalogMissing
    from catalog.runs.lifecycle import reap_stale_runs
    from catalog.store import migrate
    from catalog.store.database import check_connection, session_scope

    check_connection()
    if migrate.current(None) is None:
        raise CatalogMissing(NO_SCHEMA)
    reap_stale_runs()  # a 'running' local run whose process died is shown as interrupted
    return session_scope()


@runs_app.callback(invoke_without_command=True)
def runs(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per run (id, status, step, shards done/total).")] = False,
) -> None:
    """List extraction runs with status and shards done / total, then the latest distributed requests."""
    if ctx.invoked_subcommand is not None:
        return
    from sqlalchemy import inspect

    from catalog.runs.views import list_runs, summary_line

    def go() -> None:
        with _runs_session() as s:
            views = list_runs(s)
            if as_json:
                for v in views:
                    typer.echo(json.dumps({k: x for k, x in v.to_json().items() if k != "shards"}))
                return
            for v in views:
                typer.echo(summary_line(v))
            if inspect(s.connection()).has_table("extraction_requests"):  # from revision 0007 on
                from catalog.requests import recent

                for q in recent(s):
                    typer.echo(f"  request {q.id:>4}  {q.request.get('name') or q.request.get('model', '?'):<26} "
                               f"{q.status:<10} attempts {q.attempts}  created {q.created_at:%Y-%m-%d %H:%M}"
                               + (f"  on {q.holder}" if q.holder else "")
                               + (f"  run {q.run_id}" if q.run_id is not None else "")
                               + (f"  error: {q.error}" if q.error else ""))

    _run(go)


@runs_app.command("show")
def runs_show(
    run_id: Annotated[int, typer.Argument(help="The run's id (see `neuron-catalog runs`).")],
    as_json: Annotated[bool, typer.Option("--json", help="The run as one JSON object, with its plan and every shard.")] = False,
) -> None:
    """One run: its plan, each shard's status, attempts, timing and error; tokens/s and an ETA while it runs."""
    from catalog.read.errors import NotFound
    from catalog.runs.views import detail_lines, show_run

    def go() -> Any:
        with _runs_session() as s:
            v = show_run(s, run_id)
        if v is None:
            raise NotFound(f"no run {run_id} (see `neuron-catalog runs`)")
        return v

    v = _run(go)
    if as_json:
        typer.echo(json.dumps(v.to_json()))
        return
    for line in detail_lines(v):
        typer.echo(line)


@runs_app.command("resume")
def runs_resume(run_id: Annotated[int, typer.Argument(help="An interrupted (or failed) run's id.")]) -> None:
    """Go on with an interrupted run: finished shards are reused, the rest computed, then it publishes.
    A run of the workers' queue (`extract --distributed`) is re-queued and followed."""
    _quiet_transformers()

    def driver() -> str | None:
        from sqlalchemy import select

        from catalog.store.models import ExtractionRun

        with _runs_session() as s:
            return s.scalar(select(ExtractionRun.driver).where(ExtractionRun.id == run_id))

    if _run(driver) == "queue":
        from catalog.runs import lifecycle
        from workers.tasks import BrokerUnavailable, CelerySender

        def requeue() -> tuple[int, int]:
            kept, sent = lifecycle.requeue(lifecycle.get_engine(), run_id, CelerySender())
            return kept, sum(len(d.shards) + (d.step is not None) for d in sent)

        try:
            kept, sent = _run(requeue)
        except BrokerUnavailable as exc:
            _fail(str(exc))
        typer.echo(f"run {run_id}: kept {kept} finished shard(s); re-queued {sent} piece(s)", err=True)
        _follow_run(run_id)
        return
    from catalog.runs.local import resume

    bars = _Bars()
    try:
        summary = _run(lambda: resume(run_id, progress=bars, log=lambda m: typer.echo(m, err=True)))
    finally:
        bars.close()
    typer.echo(f"run {run_id}: reused {summary.reused_shards} finished shard(s)", err=True)
    _summary_lines(summary.name, summary.n_layers, summary.d_mlp, summary.run_id, summary.timings)


@runs_app.command("cancel")
def runs_cancel(run_id: Annotated[int, typer.Argument(help="The run to stop for good.")]) -> None:
    """Stop a run for good: it never publishes (its process, or its workers, stop at the next shard;
    its queued shards are revoked); the catalog stays as it was."""
    from catalog.runs.lifecycle import cancel

    def go() -> Any:
        with _runs_session():
            pass
        return cancel(None, run_id)

    before = _run(go)
    revoked = _revoke(run_id)
    typer.echo(f"run {run_id} cancelled (it was {before.value}){revoked}")


def _revoke(run_id: int) -> str:
    """Settle a queue-driven run's request and revoke its queued messages (best effort: a worker
    drops a cancelled run's message anyway)."""
    from sqlalchemy import select

    from catalog import requests
    from catalog.store.database import get_engine, session_scope
    from catalog.store.models import ExtractionRun, RunShard

    with session_scope() as s:
        if s.scalar(select(ExtractionRun.driver).where(ExtractionRun.id == run_id)) != "queue":
            return ""
        pieces = [(k, int(i)) for k, i in s.execute(select(RunShard.kind, RunShard.index).where(
            RunShard.run_id == run_id, RunShard.status != "done"))]
    requests.settle(get_engine(), run_id)
    try:
        from workers.tasks import revoke_run

        revoke_run(run_id, pieces)
    except Exception as exc:  # noqa: BLE001  (no broker, or celery not installed here)
        return f"; its queued shards were not revoked ({type(exc).__name__}); workers drop them when they meet them"
    return f"; revoked its {len(pieces)} unfinished shard message(s)"


@app.command()
def worker(
    concurrency: Annotated[int, typer.Option(min=1, help="Extractions run at once (worker processes; each loads its own model).")] = 1,
    queues: Annotated[str | None, typer.Option(help="Comma-separated queues to consume (default: Celery's default queue, where `extract --distributed` sends).")] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level: DEBUG, INFO, WARNING, ERROR.")] = "INFO",
) -> None:
    """Run a Celery worker for `extract --distributed` (broker CATALOG_BROKER_URL); it refuses a database whose schema revision is not this code's."""
    from catalog.store import migrate
    from catalog.store.database import DatabaseUnavailable

    try:
        migrate.require_head(None)  # workers never migrate: one `error:` line and exit 1 instead
    except (migrate.SchemaMismatch, DatabaseUnavailable) as exc:
        _fail(str(exc))
    _quiet_transformers()
    from workers.celery_app import app as celery_app

    argv = ["worker", f"--concurrency={concurrency}", "--prefetch-multiplier=1", f"--loglevel={loglevel}"]
    if queues:
        argv.append(f"--queues={queues}")
    raise typer.Exit(celery_app.start(argv=argv) or 0)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Server processes (each loads the probe model on its first probe).")] = 1,
) -> None:
    """Serve the search API (OpenAPI docs at /docs, health at /healthz) on the catalog's database."""
    import uvicorn

    from catalog.store import migrate
    from catalog.store.database import check_connection, database_url, safe_url

    _run(check_connection)
    _run(lambda: migrate.upgrade(None))  # a new database gets the schema (and answers "no catalog yet")
    typer.echo(f"serving {safe_url(database_url())} on http://{host}:{port} (docs: http://{host}:{port}/docs)", err=True)
    from catalog.api.server import JsonErrorsProtocol

    uvicorn.run("catalog.api.app:create_app", factory=True, host=host, port=port, workers=workers,
                log_level="warning", access_log=False, http=JsonErrorsProtocol)


def _schema_session() -> Any:
    """A session scope on a database that has the schema (one `error:` line otherwise)."""
    from catalog.read.catalog import NO_SCHEMA
    from catalog.read.errors import CatalogMissing
    from catalog.store import migrate
    from catalog.store.database import check_connection, session_scope

    check_connection()
    if migrate.current(None) is None:
        raise CatalogMissing(NO_SCHEMA)
    return session_scope()


@users_app.command("add")
def users_add(name: Annotated[str, typer.Argument(help="The annotator's name, shown with their annotations.")]) -> None:
    """Create an annotator (or give a new token to a revoked or imported one) and print their token once."""
    from catalog.annotations import service

    def go() -> str:
        from catalog.store import migrate
        from catalog.store.database import check_connection
        check_connection()
        migrate.upgrade(None)  # annotators may be added before the first extraction
        with _schema_session() as s:
            return service.add_annotator(s, name)

    token = _run(go)
    typer.echo(f"annotator {name.strip()!r} added; their token (shown once, keep it secret):", err=True)
    typer.echo(token)


@users_app.command("list")
def users_list() -> None:
    """List annotators: name, since when, whether their token is active."""
    from catalog.annotations import service

    def go() -> list[tuple[str, str, bool]]:
        with _schema_session() as s:
            return [(a.name, f"{a.created_at:%Y-%m-%d %H:%M}", a.token_sha256 is not None)
                    for a in service.list_annotators(s)]

    for name, since, active in _run(go):
        typer.echo(f"{name:<30} since {since}  {'active' if active else 'no token (revoked or imported)'}")


@users_app.command("revoke")
def users_revoke(name: Annotated[str, typer.Argument(help="The annotator whose token stops working.")]) -> None:
    """Revoke an annotator's token (their annotations stay)."""
    from catalog.annotations import service

    def go() -> None:
        with _schema_session() as s:
            service.revoke_annotator(s, name)

    _run(go)
    typer.echo(f"annotator {name!r}: token revoked")


@annotations_app.command("export")
def annotations_export(
    out: Annotated[Path, typer.Option(help="Output file: .jsonl or .csv (one row per revision).")],
    model: Annotated[str | None, typer.Option(help="Only this catalog entry (default: every one).")] = None,
) -> None:
    """Write every annotation with all its revisions."""
    from catalog.annotations import transfer

    def go() -> int:
        with _schema_session() as s:
            return transfer.export(s, out, model)

    typer.echo(f"wrote {_run(go)} annotation revisions to {out}")


@annotations_app.command("import")
def annotations_import(
    file: Annotated[Path, typer.Argument(help="A .jsonl or .csv file written by `annotations export`.")],
) -> None:
    """Add the annotations of a file: all of it or, on any conflict, nothing."""
    from catalog.annotations import transfer

    def go() -> transfer.ImportReport:
        with _schema_session() as s:
            return transfer.import_file(s, file)

    r = _run(go)
    typer.echo(f"imported {file}: {r.annotations_created} annotations created, {r.revisions_added} revisions "
               f"added, {r.revisions_present} already present, {r.annotators_created} annotators created")


@annotations_app.command("agreement")
def annotations_agreement(model: Annotated[str, typer.Option(help="Catalog entry name.")]) -> None:
    """Kappa between annotators per layer and overall, and agreement with the suggested label."""
    from catalog.annotations import service

    def go() -> Any:
        with _schema_session() as s:
            return service.agreement(s, model)

    rep = _run(go)

    def k(fig: Any) -> str:
        kappa = "-" if fig.kappa is None else f"{fig.kappa:.3f}"
        return f"{fig.method or '-':<7} kappa {kappa:>6} over {fig.items} neurons, {fig.annotators} annotators"

    def match(m: Any) -> str:
        return "-" if m.rate is None else f"{m.rate:.3f} ({m.matches}/{m.annotations})"

    typer.echo(f"overall   {k(rep.overall)}; human = suggested {match(rep.with_suggested)}")
    for layer in rep.layers:
        typer.echo(f"layer {layer.layer:>3} {k(layer.between_annotators)}; human = suggested {match(layer.with_suggested)}")
    for p in rep.pairs:
        typer.echo(f"pair {p.annotators[0]} / {p.annotators[1]}: kappa "
                   f"{'-' if p.kappa is None else f'{p.kappa:.3f}'} over {p.items} neurons")


def _check_database() -> None:
    # Alembic would otherwise surface an unreachable server as a raw OperationalError traceback.
    from catalog.store.database import check_connection

    _run(check_connection)


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Upgrade the schema (creates it in an empty database)."""
    from catalog.store import migrate

    _check_database()
    _run(lambda: migrate.upgrade(None, revision))
    typer.echo(f"database at revision {_run(lambda: migrate.current(None))}")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="Target revision ('base' drops everything).")]) -> None:
    """Downgrade the schema."""
    from catalog.store import migrate

    _check_database()
    _run(lambda: migrate.downgrade(None, revision))
    typer.echo(f"database at revision {_run(lambda: migrate.current(None))}")


@db_app.command("current")
def db_current() -> None:
    """Print the schema revision of the database."""
    from catalog.store import migrate

    _check_database()
    typer.echo(_run(lambda: migrate.current(None)) or "empty (no revision)")


if __name__ == "__main__":
    app()
