"""Fixtures of the jobs integration tests (defined in jobs_fixtures.py and cluster_fixtures.py,
shared with the tests)."""

from tests.integration.jobs.cluster_fixtures import cenv
from tests.integration.jobs.jobs_fixtures import db_url, env, pg_server, sqlite_env, sqlite_url

__all__ = ["cenv", "db_url", "env", "pg_server", "sqlite_env", "sqlite_url"]
