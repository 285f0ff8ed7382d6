"""The report directory: ``index.html`` (Jinja2, autoescaped: the model name and every caption are
text), one PNG per figure that has something to draw, and ``figures.json`` with each figure's numbers.

Files are written to a temporary name and renamed, ``index.html`` last, so a reader never opens a
half-written page; PNGs of figures that are no longer drawn are removed.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
from sqlalchemy.orm import Session

from catalog import __version__
from catalog.report import ReportError
from catalog.report import data as d
from catalog.report.build import MODEL_KEYS, FigureResult, model_figures
from catalog.report.captions import rule_value

DEFAULT_ROOT = Path("docs/findings")
SECTIONS = (
    ("seed 000", "Weight statistics (seed 000: feed-forward parameters)",
     ("The input matrix M1 (keys), the output matrix M2 (values) and the bias of each feed-forward layer, "
      "read from the weights alone.")),
    ("seed 001", "Key-value memories over the corpus (seed 001: Geva et al. 2021)",
     ("What triggers each key, what its value promotes, and how the trigger's memory coefficient changes "
      "when a token of the prefix is removed.")),
)

_env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
_TEMPLATE = _env.from_string("""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Findings: {{ ref.model }}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 1.5rem auto; padding: 0 1rem; color: #222;
       line-height: 1.45; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; margin-top: 2rem; }
h3 { font-size: 1.05rem; margin: 0 0 0.4rem; }
.facts { display: grid; grid-template-columns: max-content 1fr; gap: 0.2rem 1rem; }
.facts dt { font-weight: 600; color: #444; } .facts dd { margin: 0; }
figure.report-figure, section.report-figure { margin: 1.2rem 0; padding: 0.6rem; border: 1px solid #e3e3e3;
                                             border-radius: 4px; }
figure.report-figure img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: 0.9rem; color: #333; margin-top: 0.4rem; }
.note { background: #fff8e1; border-left: 3px solid #f0b400; padding: 0.5rem 0.75rem; }
code { font-size: 0.9em; }
</style>
</head>
<body>
<h1>Findings: {{ ref.model }}</h1>
<dl class="facts">
  <dt>Model</dt><dd>{{ ref.family }}, {{ ref.n_layers }} layers, {{ ref.d_mlp }} neurons per layer{{ ", gated MLP" if ref.gated else "" }}{{ ", encoder (not causal)" if not ref.causal else "" }}</dd>
  <dt>Run</dt><dd>#{{ ref.run_id }}</dd>
  <dt>Corpus</dt><dd>{% if ref.corpus %}{{ ref.corpus.get("source", "-") }} ({{ ref.corpus.get("format", "-") }}, {{ ref.corpus.get("documents", "-") }} documents, {{ ref.corpus.get("tokens", "-") }} tokens){% else %}none (weights only){% endif %}</dd>
  <dt>Label rule</dt><dd>{% if ref.label_rule %}{% for k, v in ref.label_rule | dictsort %}{{ k }} = {{ rule_value(v) }}{% if not loop.last %}, {% endif %}{% endfor %}{% else %}-{% endif %}</dd>
  <dt>Written</dt><dd>{{ written }} by neuron-catalog {{ version }}</dd>
</dl>
<p>Each figure tests one claim of a seed document: seed 000 (R. Claus, "Feed Forward Network Parameters") on the
weights, seed 001 (Geva et al. 2021, "Transformer Feed-Forward Layers Are Key-Value Memories", as presented) on
the corpus. The captions state the measured numbers; <a href="figures.json">figures.json</a> has all of them.</p>
<nav aria-label="Figures"><ol>
{% for f in figures %}
  <li><a href="#fig-{{ f.key }}">{{ f.title }}</a> ({{ f.spec.seed }}){% if f.note %}: not drawn{% endif %}</li>
{% endfor %}
</ol></nav>
{% for seed, heading, intro in sections %}
<h2 id="{{ seed | replace(' ', '') }}">{{ heading }}</h2>
<p>{{ intro }}</p>
{% for f in figures if f.spec.seed == seed %}
{% if f.note %}
<section class="report-figure" id="fig-{{ f.key }}" data-figure="{{ f.key }}">
  <h3>{{ f.title }}</h3>
  <p class="note">{{ f.note }}</p>
</section>
{% else %}
<figure class="report-figure" id="fig-{{ f.key }}" data-figure="{{ f.key }}">
  <h3>{{ f.title }}</h3>
  <img src="{{ f.key }}.png" alt="{{ f.title }}">
  <figcaption>{{ f.caption }}</figcaption>
</figure>
{% endif %}
{% endfor %}
{% endfor %}
</body>
</html>
""")


def default_out(model: str) -> Path:
    """docs/findings/<model name>, the name made safe as one path component."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("._") or "model"
    return DEFAULT_ROOT / safe


def report_html(ref: d.RunRef, figures: list[FigureResult], *, written: str | None = None) -> str:
    return _TEMPLATE.render(ref=ref, figures=figures, sections=SECTIONS, version=__version__, rule_value=rule_value,
                            written=written or datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))


def _write(path: Path, content: bytes) -> None:
    """Write beside the target and rename over it (the umask's permissions, as for any new file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_bytes(content)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class ReportSummary:
    out: Path
    drawn: list[str]  # figure keys written as PNG
    notes: dict[str, str]  # figure key -> why it was not drawn


def write_report(session: Session, model: str, out: Path | None = None) -> ReportSummary:
    """Write the report of ``model``'s current run to ``out`` (default: docs/findings/<model>)."""
    ref = d.run_ref(session, model)
    target = out if out is not None else default_out(ref.model)
    if target.exists() and not target.is_dir():
        raise ReportError(f"{target} exists and is not a directory")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot create {target}: {exc.strerror or exc}") from exc
    results = model_figures(session, ref)
    drawn, notes = [], {}
    summary: list[dict[str, Any]] = []
    try:
        for r in results:
            if r.note is None:
                _write(target / f"{r.key}.png", r.png())
                drawn.append(r.key)
            else:
                notes[r.key] = r.note
                (target / f"{r.key}.png").unlink(missing_ok=True)  # from an earlier report
            summary.append(r.summary())
        for key in MODEL_KEYS:
            if key not in drawn:
                (target / f"{key}.png").unlink(missing_ok=True)
        doc = {"model": ref.model, "run_id": ref.run_id, "n_layers": ref.n_layers, "d_mlp": ref.d_mlp,
               "label_rule": ref.label_rule, "figures": summary}
        _write(target / "figures.json", json.dumps(_finite(doc), indent=1, allow_nan=False).encode())
        _write(target / "index.html", report_html(ref, results).encode("utf-8"))
    except OSError as exc:
        raise ReportError(f"cannot write the report to {target}: {exc.strerror or exc}") from exc
    return ReportSummary(target, drawn, notes)


def _finite(v: Any) -> Any:
    """JSON-able copy: arrays as lists, NaN and infinities as null."""
    if isinstance(v, dict):
        return {str(k): _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    if hasattr(v, "tolist"):
        return _finite(v.tolist())
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
