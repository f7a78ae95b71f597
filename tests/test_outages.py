"""Stores that fail: a bad or unreachable store at start is one line before anything is written; a study storage
or tracking server that goes away mid-study is waited for, and nothing is lost or left RUNNING.

The outages are real: a PostgreSQL instance of the test's own (``private_postgres``) and an ``mlflow server``
(``mlflow_server``) are stopped under a running ``ablate study`` and started again.
"""

from __future__ import annotations

import re
import socket
import threading
import time

import optuna
import pytest
import sqlalchemy
from mlflow import MlflowClient
from optuna.trial import TrialState
from support.runs import TINY_STUDY, write_study
from support.servers import TcpRelay, free_port, pg_database
from support.studies import StudyProcess, drained

from ablate.core import names
from ablate.core.config import ConfigError
from ablate.stores.outages import MAX_BACKOFF_S, is_outage
from ablate.stores.storage import CONNECT_TIMEOUT_S, PlanLock, check_stores, open_storage

SQLITE = "sqlite:////nonexistent-folder/optuna.db"  # a store that would be written, were anything written


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def finished(storage: str, name: str) -> int:
    try:
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    except Exception:  # not created yet
        return 0
    return sum(t.state == TrialState.COMPLETE for t in trials)


# ---------------------------------------------------------------------------------------------------------------
# Before anything is written: bad or unreachable stores


def closed_port() -> int:
    return free_port()  # bound a moment ago and released: nothing listens there


def bad_stores() -> list[tuple[str, str, str, str]]:
    """(storage, tracking URI, the key named, words the one line must hold)."""
    port = closed_port()
    return [
        (f"postgresql+psycopg://postgres:hunter2@127.0.0.1:{port}/x", SQLITE, "storage", "cannot connect"),
        ("mysql+pymysql://root:hunter2@127.0.0.1/optuna", SQLITE, "storage", "unsupported"),
        ("redis://127.0.0.1:6379", SQLITE, "storage", "unsupported"),
        ("sqlite://", SQLITE, "storage", "unsupported"),  # in memory: no other worker sees it
        ("not a url", SQLITE, "storage", "not a database URL"),
        (SQLITE, f"http://alice:hunter2@127.0.0.1:{port}", "tracking_uri", "unreachable"),
        (SQLITE, f"postgresql+psycopg://postgres:hunter2@127.0.0.1:{port}/mlflow", "tracking_uri", "cannot connect"),
    ]


@pytest.mark.parametrize("wait", ["soon", "-1", "inf", "nan"])
def test_a_bad_wait_for_outages_is_one_line(wait, monkeypatch):
    monkeypatch.setenv("ABLATE_STORAGE_WAIT_S", wait)
    with pytest.raises(ConfigError, match=r"\$ABLATE_STORAGE_WAIT_S: must be a number of seconds >= 0"):
        check_stores(SQLITE, SQLITE)


@pytest.mark.parametrize("storage, tracking_uri, key, words", bad_stores(),
                         ids=["closed-port", "mysql", "redis", "in-memory", "not-a-url", "http-closed-port",
                              "tracking-db-closed-port"])  # fmt: skip
def test_a_bad_store_is_one_line_naming_it_and_its_password_masked(storage, tracking_uri, key, words):
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        check_stores(storage, tracking_uri)
    message = str(err.value)
    assert message.startswith(f"{key}: ") and words in message and "\n" not in message, message
    assert "hunter2" not in message
    assert time.monotonic() - start < CONNECT_TIMEOUT_S + 2


@pytest.mark.postgres
def test_a_missing_database_is_one_line_and_not_an_outage():
    with pg_database() as url:
        missing = url.rsplit("/", 1)[0] + "/ablate_no_such_database"
        with pytest.raises(ConfigError, match=r'storage: .*cannot connect .*"ablate_no_such_database" does not exist'):
            check_stores(missing, SQLITE)
        check_stores(url, SQLITE)  # an empty database is fine: the study creates its tables
        for target, outage in ((missing, False), (f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/x", True)):
            with pytest.raises(sqlalchemy.exc.OperationalError) as err:
                sqlalchemy.create_engine(target).connect()
            assert is_outage(err.value) is outage
            wrapped = optuna.exceptions.StorageInternalError("commit failed")
            wrapped.__cause__ = err.value  # as Optuna raises it
            assert is_outage(wrapped) is outage


def test_an_outage_longer_than_the_wait_ends_with_one_line_more(monkeypatch, capfd):
    monkeypatch.setenv("ABLATE_STORAGE_WAIT_S", "2")
    start = time.monotonic()
    with pytest.raises(sqlalchemy.exc.OperationalError):
        open_storage(f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/x", 10, lambda study, trial: None)
    assert 2 <= time.monotonic() - start < 2 + CONNECT_TIMEOUT_S
    err = capfd.readouterr().err.splitlines()
    assert err[0].startswith("ablate: study storage unreachable (OperationalError: connection failed: ")
    assert err[0].endswith("waiting up to 2 s") and len(err) == 2, err
    assert err[1].startswith("ablate: study storage still unreachable after 2 s; giving up ($ABLATE_STORAGE_WAIT_S")


def test_a_tracking_server_that_never_answers_fails_within_the_connect_timeout():
    """Accepted but never answered (a hung server, a firewall dropping replies): MLflow's own retries would take
    minutes; the check gives up after CONNECT_TIMEOUT_S."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(ConfigError, match="tracking_uri: MLflow tracking server .* unreachable"):
            check_stores(SQLITE, uri)
        took = time.monotonic() - start
    print(f"\nhung tracking server: one line after {took:.1f} s")
    assert took < CONNECT_TIMEOUT_S + 2


def test_an_unreachable_tracking_server_stops_the_study_before_any_store_is_written(tmp_path):
    spec = write_study(tmp_path / "nowhere.yaml", name="nowhere", tracking_uri=f"http://127.0.0.1:{closed_port()}")
    start = time.monotonic()
    code, out = StudyProcess(spec, tmp_path, "--storage", f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}").wait(120)
    took = time.monotonic() - start
    print(f"\nunreachable tracking server: exit {code}, one line after {took:.1f} s (with process start)")
    assert code == 2 and out.strip().count("\n") == 0, out
    assert "tracking_uri: MLflow tracking server http://127.0.0.1:" in out and "unreachable" in out
    assert not (tmp_path / "runs").exists()  # no Optuna study, no SQLite file, no MLflow store
    assert took < 60


def test_every_storage_call_a_study_makes_waits_out_an_outage():
    """Studies call their storage through Optuna's ``_CachedStorage``, partly by private names: each of those
    that reaches the database must be one that ``OutageTolerantStorage`` retries (this fails on an Optuna that
    renames them)."""
    import inspect

    from optuna.storages._cached_storage import _CachedStorage

    from ablate.stores.outages import RETRIED, OutageTolerantStorage

    called = set(re.findall(r"self\._backend\.(\w+)\(", inspect.getsource(_CachedStorage)))
    no_database = {"get_heartbeat_interval", "get_heartbeat_stale_trial_callback"}
    assert called - no_database - {"_get_stale_trial_ids"} <= set(RETRIED), called - set(RETRIED)
    assert "_get_stale_trial_ids" in vars(OutageTolerantStorage)


def test_optunas_private_parts_are_where_the_runner_reaches_for_them():
    """The runner reaches into Optuna in one module (planned values of an enqueued trial, storage ids, the heartbeat
    thread): an Optuna release that moves any of it fails here, naming the version, not in a user's study."""
    from ablate.core import optuna_private

    assert not optuna_private.missing(), f"Optuna {optuna.__version__} moved {optuna_private.missing()}"


def test_a_stop_leaves_a_trial_that_finished_on_its_way_alone(monkeypatch):
    """A stop reads the trial RUNNING, and it completes before the stop can end it: it keeps its result and is not
    queued again (this raised UpdateFinishedTrialError into the worker's stop handling)."""
    from ablate.design import recovery

    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    study.enqueue_trial({"x": 1.0}, user_attrs={names.ATTR_PHASE: "tune", names.ATTR_VARIANT: "base",
                                                names.ATTR_POINT: 0})
    trial = study.ask()
    trial.suggest_float("x", 0, 2)
    running = study.trials[0]  # what the stop reads ...
    study.tell(trial, 0.5)  # ... just before the trial completes
    reads, storage = iter([running]), study._storage
    real = storage.get_trial
    monkeypatch.setattr(storage, "get_trial", lambda trial_id: next(reads, None) or real(trial_id))
    assert not recovery.stop_trial(study, trial.number, names.INTERRUPTED, "signal SIGTERM")
    assert [t.state.name for t in study.trials] == ["COMPLETE"]


# ---------------------------------------------------------------------------------------------------------------
# Locks beside a SQLite file


def test_plan_lock_on_sqlite_is_one_file_beside_it_and_refuses_a_symlink(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    first, second = PlanLock(storage, "s"), PlanLock(storage, "s")
    got = threading.Event()
    with first:
        waiter = threading.Thread(target=lambda: (second.__enter__(), got.set()), daemon=True)
        waiter.start()
        assert not got.wait(0.5)  # flock: two opens exclude each other, in one process too
    assert got.wait(5)
    second.release()
    second.release()  # idempotent
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optuna.db.s.lock"]
    for _ in range(3):
        with PlanLock(storage, "s"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optuna.db.s.lock"]  # no pile-up
    (tmp_path / "elsewhere").write_text("")
    (tmp_path / "optuna.db.t.lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="symlink"), PlanLock(storage, "t"):
        pass
    with pytest.raises(ConfigError, match="storage: .*sqlite:///PATH .* PostgreSQL"):
        PlanLock("mysql+pymysql://root:hunter2@127.0.0.1/optuna", "s")


# ---------------------------------------------------------------------------------------------------------------
# Outages mid-study


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_no_trial_is_judged_stale_for_the_silence_of_an_outage(private_postgres, capfd):
    """Heartbeats cannot be written while the server is down: for a grace period after it is back, no trial is
    stale (its worker's next heartbeat is on its way); after that, a silent trial is stale again (a dead worker)."""
    with pg_database(private_postgres.url) as url:
        storage = open_storage(url, 1, lambda study, trial: None)  # stale after 3 s without a heartbeat
        study = optuna.create_study(storage=storage, study_name="stale")
        trial = study.ask()
        storage.record_heartbeat(trial._trial_id)
        private_postgres.stop()
        threading.Timer(5, private_postgres.start).start()
        assert len(study.get_trials()) == 1  # waits out the 5 s outage
        assert storage._get_stale_trial_ids(study._study_id) == []
        time.sleep(3 + MAX_BACKOFF_S + 0.5)
        assert storage._get_stale_trial_ids(study._study_id) == [trial._trial_id]
        storage.engine.dispose()
    err = capfd.readouterr().err
    assert err.count("ablate: study storage unreachable (OperationalError: ") == 1, err
    assert re.search(r"ablate: study storage reachable again after [4-9] s", err), err


def test_a_study_storage_outage_is_waited_out(private_postgres, tmp_path):
    """PostgreSQL stopped for 20 s mid-study (sessions ended, connections refused) and started again: both workers
    wait, print one line when it starts and one when it ends, and go on. Heartbeats every 2 s (a trial is stale
    after 6 s of silence) are shorter than the outage: no live trial may be failed for the server's silence."""
    outage_s = 20
    with pg_database(private_postgres.url) as storage:
        tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        spec = write_study(tmp_path / "outage.yaml", name="outage", tracking_uri=tracking_uri, heartbeat=2, points=2,
                           seeds=2, train={**TINY_STUDY["train"], "steps": 30})  # fmt: skip
        study = StudyProcess(spec, tmp_path, "--storage", storage, "--workers", "2",
                             env={"ABLATE_STORAGE_WAIT_S": "120"})
        try:
            wait_for(lambda: finished(storage, "outage") >= 1, 240, "a finished trial")
            private_postgres.stop()
            time.sleep(outage_s)
            private_postgres.start()
        finally:
            code, out = study.wait()
        waits = [int(s) for s in re.findall(r"study storage reachable again after (\d+) s", out)]
        counts = drained(storage, tracking_uri, "outage", planned=8)
    print(f"\nstudy storage down {outage_s} s: {len(waits)} processes waited (longest {max(waits, default=0)} s); "
          f"exit {code}; {counts}")  # fmt: skip
    assert code == 0, out[-3000:]
    assert "study storage unreachable (" in out and waits and "Traceback" not in out, out[-3000:]
    assert counts == dict.fromkeys(counts, 0), counts


def test_a_tracking_server_cut_off_mid_study_loses_nothing(mlflow_server, tmp_path):
    """The study logs to an ``mlflow server`` through a relay; after the first trial the relay is cut for 15 s
    (connections reset, new ones refused, as when the server stops; restored at once, where a real restart takes
    half a minute here). MLflow's client retries: every trial's run is FINISHED with all its metric steps."""
    outage_s = 15
    relay = TcpRelay(mlflow_server.port)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    spec = write_study(tmp_path / "served.yaml", name="served", tracking_uri=f"http://127.0.0.1:{relay.port}")
    start = time.monotonic()
    study = StudyProcess(spec, tmp_path, "--storage", storage)
    try:
        wait_for(lambda: finished(storage, "served") >= 1, 240, "a finished trial")
        relay.cut()
        cut_at = time.monotonic()
        time.sleep(outage_s)
        relay.restore()
    finally:
        code, out = study.wait()
    after_cut = time.monotonic() - cut_at
    print(f"\ntracking server cut off {outage_s} s: the study ended {after_cut:.0f} s after the cut "
          f"({time.monotonic() - start:.0f} s in all), exit {code}")  # fmt: skip
    assert code == 0, out[-3000:]
    assert after_cut > outage_s  # it was still running when the link came back: every later write went through
    counts = drained(storage, mlflow_server.uri, "served", planned=4)
    print(counts)
    assert counts == dict.fromkeys(counts, 0), counts
    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name("served").experiment_id],
                              filter_string=f"tags.`{names.TAG_ROLE}` = 'trial'")  # fmt: skip
    for key in (names.TRAIN_LOSS, names.VAL_LOSS):
        steps = {tuple(sorted(m.step for m in client.get_metric_history(r.info.run_id, key))) for r in runs}
        assert len(steps) == 1 and steps != {()}, (key, steps)  # every run has the same, complete history
