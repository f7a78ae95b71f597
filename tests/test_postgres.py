"""Workers on several machines share one study through PostgreSQL: each test on a database of its own, created
and dropped (``pg_url``), so the races of a first use (Optuna's and MLflow's schemas) are met every run."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import TINY_STUDY, pg_database
from mlflow import MlflowClient
from optuna.trial import TrialState

from ablate import names
from ablate.storage import PlanLock

pytestmark = pytest.mark.postgres
# 4 variants x (5 tune points + 5 seeds) = 40 trials: num_heads 2 (base), 4, 1; attn_dropout 0.1
FORTY = {"scientific": {"model.num_heads": [2, 4, 1], "model.attn_dropout": [0.0, 0.1]}, "points": 5, "seeds": 5}


def write_spec(tmp_path: Path, name: str, **changes: object) -> Path:
    spec = {**TINY_STUDY, "name": name, **changes}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def machines(n: int, tmp_path: Path, spec: Path, storage: str, *args: str) -> list[tuple[subprocess.Popen, Path]]:
    """``n`` ``ablate study`` processes, each with a temp folder of its own, as on ``n`` machines; output in files
    (a pipe read only at the end fills up and stalls its process)."""
    procs = []
    for i in range(n):
        tmp = tmp_path / f"machine{i}"
        tmp.mkdir()
        env = {**os.environ, "TMPDIR": str(tmp)}
        cmd = [sys.executable, "-m", "ablate.cli", "study", str(spec), "--storage", storage, "--no-report", *args]
        with open(tmp / "out.log", "w") as out:
            procs.append((subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT),
                          tmp / "out.log"))  # fmt: skip
    return procs


def finish(procs: list[tuple[subprocess.Popen, Path]], timeout: float = 300) -> list[str]:
    try:
        codes = [p.wait(timeout) for p, _ in procs]
    finally:
        for p, _ in procs:
            p.kill()
    outs = [log.read_text(errors="replace") for _, log in procs]
    assert codes == [0] * len(procs), "\n".join(o[-2000:] for o in outs)
    return outs


def check_drained(storage: str, tracking_uri: str, name: str, planned: int) -> list:
    """Every planned (phase, variant, point) ran once and completed; no sampled trial; one FINISHED run each."""
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    keys = collections.Counter((t.user_attrs.get(names.ATTR_PHASE), t.user_attrs.get(names.ATTR_VARIANT),
                                t.user_attrs.get(names.ATTR_POINT)) for t in trials)  # fmt: skip
    unplanned = [t.number for t in trials if t.user_attrs.get(names.ATTR_PHASE) not in ("tune", "seed")]
    assert unplanned == [] and len(keys) == planned and set(keys.values()) == {1}, (unplanned, keys)
    assert {t.state for t in trials} == {TrialState.COMPLETE}
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id], max_results=1000)
    assert sorted(r.data.tags[names.TAG_ROLE] for r in runs) == ["study"] + ["trial"] * planned
    assert {r.info.status for r in runs} == {"FINISHED"}
    return trials


def test_four_machines_share_a_study_and_its_tracking_store_on_fresh_databases(pg_url, tmp_path):
    """Four ``ablate study`` processes, each with a temp folder of its own (no lock file in common), start together
    on two empty databases (the study storage and MLflow's backend store): they race to create both schemas, then
    drain a plan of 40 trials with no unplanned and no repeated trial. Prints the throughput."""
    with pg_database() as tracking_uri:
        spec = write_spec(tmp_path, "forty", tracking_uri=tracking_uri, **FORTY)
        start = time.monotonic()
        outs = finish(machines(4, tmp_path, spec, pg_url))
        took = time.monotonic() - start
        trials = optuna.load_study(study_name="forty", storage=pg_url).get_trials()
        first = min(t.datetime_start for t in trials)
        busy = (max(t.datetime_complete for t in trials) - first).total_seconds()
        waits = sum(o.count("study storage unreachable") for o in outs)
        print(f"\n4 machines x 1 worker, 40 planned trials: {len(trials)} trials, {took:.0f} s in all, "
              f"{len(trials) / busy * 60:.0f} trials/min from the first trial's start to the last one's end "
              f"({busy:.0f} s); retries {len(trials) - 40}, storage waits {waits}")  # fmt: skip
        check_drained(pg_url, tracking_uri, "forty", planned=40)  # so no retry either
    assert waits == 0


def test_plan_lock_holds_across_machines_and_ends_with_its_holder(pg_url, tmp_path):
    """A PostgreSQL advisory lock: held by a process with another temp folder, it blocks us; the holder killed
    (SIGKILL: no clean-up runs), its session ends and we get the lock within seconds. Release is idempotent."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom ablate.storage import PlanLock\n"
         "with PlanLock(sys.argv[1], 'study'):\n    print('locked', flush=True)\n    time.sleep(600)\n", pg_url],
        env={**os.environ, "TMPDIR": str(tmp_path)}, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        lock, got = PlanLock(pg_url, "study"), threading.Event()
        waiter = threading.Thread(target=lambda: (lock.__enter__(), got.set()), daemon=True)
        waiter.start()
        assert not got.wait(2.0), "the lock was taken while another process held it"
        with PlanLock(pg_url, "another study"):  # one lock per study
            pass
        killed = time.monotonic()
        os.kill(holder.pid, signal.SIGKILL)
        assert got.wait(30), "the lock of a killed holder was not freed"
        print(f"\nlock of a SIGKILLed holder taken after {time.monotonic() - killed:.2f} s")
        lock.release()
        lock.release()
        with lock:  # reusable once released
            pass
    finally:
        holder.kill()
        holder.wait()
