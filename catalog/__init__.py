"""Neuron Catalog: what each FFN neuron of a transformer stores, extracted into Postgres.

Data flow: corpus + model -> ``catalog.extract`` (pure tensor maths) -> ``catalog.store``
(Postgres via SQLAlchemy + COPY) -> API / UI (later parts). Layer and neuron indices are 0-based
everywhere.
"""
