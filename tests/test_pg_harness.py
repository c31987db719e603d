"""The PostgreSQL test harness itself: in CI a missing server fails the tests, elsewhere it skips them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import pg


@pytest.mark.parametrize("value", ["true", "1", "TRUE"])
def test_unavailable_fails_in_ci(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match="PostgreSQL tests cannot run in CI: no binaries"):
        pg.unavailable("no binaries")


def test_unavailable_skips_on_a_developer_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="PostgreSQL not available: no binaries"):
        pg.unavailable("no binaries")


def test_a_server_that_will_not_start_fails_even_off_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.fail.Exception, match="PostgreSQL could not be started: pg_ctl failed"):
        pg.unavailable("pg_ctl failed", missing=False)


def test_missing_binaries_are_named_with_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PG_BINDIR", str(tmp_path))  # an explicit directory without initdb
    assert pg.find_bindir() is None
    with pytest.raises(pg.ClusterError, match="has no initdb/pg_ctl; install the server package") as info:
        pg.start_cluster()
    assert info.value.missing
