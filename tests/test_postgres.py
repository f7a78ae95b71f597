"""Two `ablate study` processes (as on two machines) share one study through PostgreSQL and drain it once."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import uuid

import optuna
import pytest
import yaml
from conftest import TINY_STUDY
from mlflow import MlflowClient
from optuna.trial import TrialState

from ablate import names

URL = os.environ.get("ABLATE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
pytestmark = pytest.mark.postgres


def _reachable() -> str:
    try:
        import psycopg

        psycopg.connect(URL.replace("+psycopg", ""), connect_timeout=3).close()
    except Exception as err:
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return ""


@pytest.fixture
def pg_url():
    """A database created for this test and dropped after it: a new user's empty database, never tables left
    behind by an earlier run (two workers racing to create Optuna's schema is exactly what must work)."""
    import psycopg

    reason = _reachable()
    if reason:
        pytest.skip(f"PostgreSQL not reachable at {URL} ({reason})")
    server = URL.replace("+psycopg", "")
    db = f"ablate_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    yield URL.rsplit("/", 1)[0] + f"/{db}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{db}" WITH (FORCE)')


def test_two_processes_share_a_postgres_study_on_a_fresh_database(pg_url, tmp_path):
    pg_study = "pg"
    spec = {**TINY_STUDY, "name": pg_study, "points": 2, "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    path = tmp_path / "pg.yaml"
    path.write_text(yaml.safe_dump(spec))
    cmd = [sys.executable, "-m", "ablate.cli", "study", str(path), "--storage", pg_url, "--no-report"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]

    trials = optuna.load_study(study_name=pg_study, storage=pg_url).get_trials()
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    keys = collections.Counter((t.user_attrs[names.ATTR_PHASE], t.user_attrs[names.ATTR_VARIANT],
                                t.user_attrs[names.ATTR_POINT]) for t in trials)  # fmt: skip
    assert set(keys.values()) == {1}
    client = MlflowClient(spec["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name(pg_study).experiment_id])
    assert sorted(r.data.tags[names.TAG_ROLE] for r in runs) == ["study"] + ["trial"] * 6
    assert {r.info.status for r in runs} == {"FINISHED"}
