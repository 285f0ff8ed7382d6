"""The read side: pydantic schemas (the API contract), queries, search and export. Imports no torch."""
