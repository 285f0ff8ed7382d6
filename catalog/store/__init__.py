"""Postgres storage: ORM tables (the one schema definition), sessions, bulk ingest."""
