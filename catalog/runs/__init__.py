"""The write side: runs and their shards, the only code that commits run state.

``schemas`` (requests, summaries), ``lifecycle`` (run and shard rows: registration, leases, fencing,
publish; torch-free), ``sharded`` (the steps of a run: pass shards, merge, ablation shards, finish)
and ``local`` (plans and drives a run in this process; resumes one).
"""
