"""Fixtures of the jobs integration tests (defined in jobs_fixtures.py, shared with the tests)."""

from tests.integration.jobs.jobs_fixtures import db_url, env, pg_server, sqlite_env, sqlite_url

__all__ = ["db_url", "env", "pg_server", "sqlite_env", "sqlite_url"]
