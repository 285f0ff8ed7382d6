"""The `neuron-catalog` command as a user runs it: a subprocess against the test Postgres.

Every bad input must end with exactly one `error: ...` line on stderr, a non-zero exit status and
no traceback; `--help` must explain every option; the happy path extracts and exports a tiny model.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import tiny_models
import typer
from alembic.script import ScriptDirectory
from cli_runner import Result, cli
from sqlalchemy import delete
from tiny_models import D_MLP, N_LAYERS

from catalog.cli import app
from catalog.store.database import get_engine, session_scope
from catalog.store.migrate import alembic_config
from catalog.store.models import CatalogModel

UNREACHABLE = "postgresql://nobody@127.0.0.1:1/x"


def run_all(cases: dict[str, tuple[tuple[str, ...], dict[str, str]]]) -> dict[str, Result]:
    """Run several commands at once (each start is mostly importing torch)."""
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {k: pool.submit(cli, *args, env=env) for k, (args, env) in cases.items()}
        return {k: f.result() for k, f in futures.items()}


def assert_one_error_line(r: Result, *fragments: str) -> str:
    """Non-zero exit, no traceback, and stderr is exactly one `error:` line containing the fragments."""
    assert r.returncode != 0, r
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    for fragment in fragments:
        assert fragment.lower() in line.lower(), (fragment, line)
    return line


NAME_PREFIX = "test-cli-"


@pytest.fixture(scope="module", autouse=True)
def _database(migrated_db: str) -> Iterator[str]:
    yield migrated_db
    # The database is shared by the whole session: leave no catalog behind for other modules.
    with session_scope(get_engine(migrated_db)) as s:
        s.execute(delete(CatalogModel).where(CatalogModel.name.startswith(NAME_PREFIX, autoescape=True)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.save("opt", tmp_path_factory.mktemp("cli-model") / "tiny-opt")


# --- bad inputs -------------------------------------------------------------------------------
# Each case is its own process; they run concurrently because every start imports torch.


def _with_model_type(src: Path, dst: Path, model_type: str) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((dst / "config.json").read_text())
    config["model_type"] = model_type
    (dst / "config.json").write_text(json.dumps(config))
    return dst


FAMILY_NAMES = ("GPT-2", "GPT-NeoX", "OPT", "LLaMA", "BERT")  # an unsupported model's error names them all

# case -> (what the error line must contain)
BAD_INPUTS: dict[str, tuple[str, ...]] = {
    "missing path": ("model not found", "{missing}"),
    "text file": ("not a model", "{notes}"),
    "junk gguf": ("gguf", "{junk}"),
    "directory without config.json": ("config.json", "{empty}"),
    # known to transformers, not to the catalog (BERT is supported since encoders came in)
    "t5 model_type": ("unsupported architecture", "'t5'", *FAMILY_NAMES),
    "unknown model_type": ("unsupported architecture", "frobnicate", *FAMILY_NAMES),
    "unreachable db: extract": ("cannot connect to the database", "127.0.0.1:1"),
    "unreachable db: export": ("cannot connect to the database", "127.0.0.1:1"),
    "unreachable db: db current": ("cannot connect to the database", "127.0.0.1:1"),
    "unreachable db: db upgrade": ("cannot connect to the database", "127.0.0.1:1"),
    "export of unknown catalog": ("no completed catalog", "{unknown}"),
    "unknown --bos token": ("--bos", "<nosuch>", "no such token"),
}


@pytest.fixture(scope="module")
def bad_input_results(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Result, dict[str, str]]]:
    root = tmp_path_factory.mktemp("bad-inputs")
    notes = root / "notes.txt"
    notes.write_text("the cat sat on the mat\n")
    junk = root / "junk.gguf"
    junk.write_bytes(b"this is not a GGUF file at all\n" * 64)
    empty = root / "no-config"
    empty.mkdir()
    (empty / "weights.bin").write_bytes(b"\0" * 16)
    out_dir = root / "exports"
    out_dir.mkdir()
    places = {
        "missing": str(root / "no" / "such-model"), "notes": str(notes), "junk": str(junk), "empty": str(empty),
        "unknown": f"never-extracted-{uuid.uuid4().hex[:8]}", "out_dir": str(out_dir),
    }
    down = {"CATALOG_DATABASE_URL": UNREACHABLE}
    out = str(out_dir / "out.jsonl")
    cases: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
        "missing path": (("extract", "--model", places["missing"]), {}),
        "text file": (("extract", "--model", places["notes"]), {}),
        "junk gguf": (("extract", "--model", places["junk"]), {}),
        "directory without config.json": (("extract", "--model", places["empty"]), {}),
        "t5 model_type": (("extract", "--model", str(_with_model_type(model_dir, root / "t5", "t5"))), {}),
        "unknown model_type": (
            ("extract", "--model", str(_with_model_type(model_dir, root / "frob", "frobnicate"))), {}),
        "unreachable db: extract": (("extract", "--model", str(model_dir)), down),
        "unreachable db: export": (("export", "--model", "anything", "--out", out), down),
        "unreachable db: db current": (("db", "current"), down),
        "unreachable db: db upgrade": (("db", "upgrade"), down),
        "export of unknown catalog": (("export", "--model", places["unknown"], "--out", out), {}),
        "unknown --bos token": (("extract", "--model", str(model_dir), "--name", NAME_PREFIX + "bos",
                                 "--corpus", places["notes"], "--bos", "<nosuch>"), {}),
    }
    assert set(cases) == set(BAD_INPUTS)
    results = run_all(cases)
    return {k: (r, places) for k, r in results.items()}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(bad_input_results: dict[str, tuple[Result, dict[str, str]]], case: str) -> None:
    result, places = bad_input_results[case]
    assert_one_error_line(result, *(f.format(**places) for f in BAD_INPUTS[case]))
    assert list(Path(places["out_dir"]).iterdir()) == []  # no export file, not even a partial one
    if case == "unknown --bos token":  # refused before any row was written
        from sqlalchemy import select

        with session_scope(get_engine()) as s:
            assert s.scalar(select(CatalogModel).where(CatalogModel.name == NAME_PREFIX + "bos")) is None


# --- help -------------------------------------------------------------------------------------


def _commands() -> list[tuple[tuple[str, ...], object]]:
    """(path, click command) for the app, every group and every command."""
    root = typer.main.get_command(app)
    out: list[tuple[tuple[str, ...], object]] = []

    def walk(path: tuple[str, ...], cmd: object) -> None:
        out.append((path, cmd))
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            walk((*path, name), sub)

    walk((), root)
    return out


COMMANDS = _commands()


def test_every_command_is_covered() -> None:
    paths = {" ".join(p) for p, _ in COMMANDS}
    assert {"extract", "export", "layers", "show", "runs", "db", "db upgrade", "db downgrade", "db current"} <= paths


@pytest.fixture(scope="module")
def help_results() -> dict[tuple[str, ...], Result]:
    results = run_all({" ".join(p): ((*p, "--help"), {}) for p, _ in COMMANDS})
    return {p: results[" ".join(p)] for p, _ in COMMANDS}


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[" ".join(p) or "neuron-catalog" for p, _ in COMMANDS])
def test_help(help_results: dict[tuple[str, ...], Result], path: tuple[str, ...], command: object) -> None:
    r = help_results[path]
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "Usage:" in r.stdout
    summary = (getattr(command, "help", None) or "").strip().splitlines()
    assert summary, f"{path} has no help text"
    assert " ".join(summary[0].split()[:4]) in " ".join(r.stdout.split())
    for param in getattr(command, "params", []):
        if param.param_type_name == "option":
            name = max(param.opts, key=len)  # e.g. --max-tokens
            assert name in r.stdout, (path, name)
            if name != "--help":
                assert (param.help or "").strip(), f"{' '.join(path)} {name} has no help"
        else:
            assert (param.name or "").lower() in r.stdout.lower(), (path, param.name)
            assert (getattr(param, "help", None) or "").strip(), f"{' '.join(path)} {param.name} has no help"
    for sub in getattr(command, "commands", {}):
        assert sub in r.stdout


# --- happy path -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_catalog(model_dir: Path) -> str:
    """A catalog extracted through the CLI; returns its name."""
    name = f"{NAME_PREFIX}{uuid.uuid4().hex[:8]}"
    r = cli("extract", "--model", str(model_dir), "--name", name)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert f"catalog {name!r}: {N_LAYERS} layers x {D_MLP} neurons" in r.stdout
    assert f"neuron-catalog export --model {name}" in r.stdout
    return name


@pytest.fixture(scope="module")
def after_extract(cli_catalog: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Result, Path]]:
    """Commands on the CLI-extracted catalog, run concurrently: case -> (result, output path)."""
    root = tmp_path_factory.mktemp("cli-exports")
    outs = {
        "jsonl": root / "ok" / "catalog.jsonl", "parquet": root / "ok" / "catalog.parquet",
        "csv": root / "csv" / "out.csv", "no suffix": root / "bare" / "out", "missing dir": root / "gone" / "sub" / "out.jsonl",
    }
    for key in ("jsonl", "csv", "no suffix"):
        outs[key].parent.mkdir(exist_ok=True)
    (root / "gone").mkdir()
    cases: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
        key: (("export", "--model", cli_catalog, "--out", str(out)), {}) for key, out in outs.items()
    }
    cases["show"] = (("show", "--model", cli_catalog, "--layer", "1", "--neuron", "3"), {})
    cases["show missing neuron"] = (("show", "--model", cli_catalog, "--layer", str(N_LAYERS), "--neuron", "0"), {})
    cases["runs"] = (("runs",), {})
    cases["db current"] = (("db", "current"), {})
    results = run_all(cases)
    return {k: (r, outs.get(k, root)) for k, r in results.items()}


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_extract_then_export(after_extract: dict[str, tuple[Result, Path]], cli_catalog: str, suffix: str) -> None:
    r, out = after_extract[suffix]
    assert r.returncode == 0, r.stderr
    assert f"wrote {N_LAYERS * D_MLP} neuron records to {out}" in r.stdout
    if suffix == "jsonl":
        recs = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    else:
        recs = pq.read_table(out).to_pylist()
    assert [(x["layer"], x["neuron"]) for x in recs] == [(x, n) for x in range(N_LAYERS) for n in range(D_MLP)]
    vocab = tiny_models.SPECIAL + tiny_models.WORDS
    for rec in recs:
        assert rec["model"] == cli_catalog
        assert rec["key_norm"] > 0 and rec["value_norm"] > 0 and -1 <= rec["alignment"] <= 1
        assert isinstance(rec["bias"], float)  # OPT's fc1 has a bias
        top = rec["value_top_tokens"]
        assert len(top) == 30 and len(rec["value_bottom_tokens"]) == 10
        assert all(set(t) == {"token_id", "token", "logit"} for t in top)
        assert [t["logit"] for t in top] == sorted((t["logit"] for t in top), reverse=True)
        assert all(t["token"] == vocab[t["token_id"]] for t in top)


@pytest.mark.parametrize(
    ("case", "fragment"),
    [("csv", ".jsonl or .parquet"), ("no suffix", ".jsonl or .parquet"), ("missing dir", "does not exist")],
)
def test_export_to_bad_path(after_extract: dict[str, tuple[Result, Path]], case: str, fragment: str) -> None:
    r, out = after_extract[case]
    assert_one_error_line(r, "cannot export", fragment)
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_show_and_runs(after_extract: dict[str, tuple[Result, Path]], cli_catalog: str) -> None:
    r, _ = after_extract["show"]
    assert r.returncode == 0, r.stderr
    assert "key_norm" in r.stdout and "value top tokens" in r.stdout
    r, _ = after_extract["runs"]
    assert r.returncode == 0, r.stderr
    assert any(line.startswith("*") and cli_catalog in line and "complete" in line for line in r.stdout.splitlines())


def test_show_of_missing_neuron(after_extract: dict[str, tuple[Result, Path]], cli_catalog: str) -> None:
    assert_one_error_line(after_extract["show missing neuron"][0], cli_catalog, f"{N_LAYERS}/0")


def test_db_current_prints_the_head_revision(after_extract: dict[str, tuple[Result, Path]], migrated_db: str) -> None:
    head = ScriptDirectory.from_config(alembic_config(migrated_db)).get_current_head()
    assert head
    r, _ = after_extract["db current"]
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == head
