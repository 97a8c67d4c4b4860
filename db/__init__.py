"""The archive index: typed models, queries, and Alembic migrations."""
