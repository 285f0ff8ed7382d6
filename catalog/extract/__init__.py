"""Pure extraction maths over tensors: no database, no Celery."""
