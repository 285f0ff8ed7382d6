"""Neuron Catalog: what each FFN neuron of a transformer stores, extracted into Postgres.

Data flow: corpus + model -> ``catalog.extract`` (pure tensor maths) -> ``catalog.store``
(Postgres via SQLAlchemy + COPY) -> ``catalog.read`` (queries, no torch) -> ``catalog.api`` (FastAPI).
Layer and neuron indices are 0-based everywhere.
"""

__version__ = "0.2.0"

import os

# GNU OpenMP (torch's CPU threads) spins a worker for about 300,000 rounds after each parallel
# operation before it sleeps: milliseconds of a core. The corpus pass folds each layer on CPU
# threads of its own between two torch operations (catalog/extract/fold.py), and the spinning
# worker took a core from it: 10k demo tokens, pass / plain 1.30x -> 1.20x with 10,000 rounds, the
# plain pass unchanged (bench/part10_fold.py). Read once, when torch loads; a value already set wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
