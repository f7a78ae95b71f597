"""Workers on several machines share one study through PostgreSQL: each test on a database of its own, created
and dropped (``pg_url``), so the races of a first use (Optuna's and MLflow's schemas) are met every run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from support.runs import write_study
from support.servers import pg_database
from support.studies import StudyProcess, drained

from ablate.stores.storage import PlanLock

pytestmark = pytest.mark.postgres
# 4 variants x (5 tune points + 5 seeds) = 40 trials: num_heads 2 (base), 4, 1; attn_dropout 0.1
FORTY = {"scientific": {"model.num_heads": [2, 4, 1], "model.attn_dropout": [0.0, 0.1]}, "points": 5, "seeds": 5}


def machines(n: int, tmp_path: Path, spec: Path, storage: str, *args: str) -> list[StudyProcess]:
    """``n`` ``ablate study`` processes, each with a temp folder of its own, as on ``n`` machines."""
    procs = []
    for i in range(n):
        tmp = tmp_path / f"machine{i}"
        tmp.mkdir()
        procs.append(StudyProcess(spec, tmp_path, "--storage", storage, *args, env={"TMPDIR": str(tmp)},
                                  log=tmp / "out.log"))  # fmt: skip
    return procs


def finish(procs: list[StudyProcess], timeout: float = 300) -> list[str]:
    codes, outs = zip(*(p.wait(timeout) for p in procs), strict=True)
    assert list(codes) == [0] * len(procs), "\n".join(o[-2000:] for o in outs)
    return list(outs)


def test_four_machines_share_a_study_and_its_tracking_store_on_fresh_databases(pg_url, tmp_path):
    """Four ``ablate study`` processes, each with a temp folder of its own (no lock file in common), start together
    on two empty databases (the study storage and MLflow's backend store): they race to create both schemas, then
    drain a plan of 40 trials with no unplanned and no repeated trial. Prints the throughput."""
    with pg_database() as tracking_uri:
        spec = write_study(tmp_path / "forty.yaml", name="forty", tracking_uri=tracking_uri, **FORTY)
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
        counts = drained(pg_url, tracking_uri, "forty", planned=40)
        assert counts == dict.fromkeys(counts, 0), counts  # so no retry either
    assert waits == 0


def test_plan_lock_holds_across_machines_and_ends_with_its_holder(pg_url, tmp_path):
    """A PostgreSQL advisory lock: held by a process with another temp folder, it blocks us; the holder killed
    (SIGKILL: no clean-up runs), its session ends and we get the lock within seconds. Release is idempotent."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom ablate.stores.storage import PlanLock\n"
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
