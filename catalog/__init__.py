"""Neuron Catalog: what each FFN neuron of a transformer stores, extracted into Postgres.

Data flow: corpus + model -> ``catalog.extract`` (pure tensor maths) -> ``catalog.store``
(Postgres via SQLAlchemy + COPY) -> ``catalog.read`` (queries, no torch) -> ``catalog.api`` (FastAPI).
Layer and neuron indices are 0-based everywhere.
"""

__version__ = "0.2.0"
