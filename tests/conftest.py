"""Shared pytest setup. torch is imported lazily: report tests must run without it."""

from __future__ import annotations

import atexit
import contextlib
import glob
import math
import os
import pwd
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, Metric, Param
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from ablate import names
from ablate.config import RunConfig, flatten, run_config_from, to_dict, with_values

ROOT = Path(__file__).resolve().parent.parent  # the checkout: studies/ are read from here, never from the cwd

# The smallest run and study that still exercise every path: shared by the trainer, tracking and study tests.
TINY_RUN = {
    "model": {"embed_dim": 16, "num_heads": 2, "num_layers": 1},
    "task": {"name": "recall", "seq_len": 16, "num_train": 64, "num_val": 24, "num_test": 8, "num_pairs": 2,
             "vocab_size": 8},
    "train": {"steps": 20, "batch_size": 8, "log_every": 5, "eval_every": 10, "eval_batches": 2, "threads": 1,
              "device": "cpu", "warmup_steps": 2, "lr": 3e-3},
}  # fmt: skip
TINY_STUDY = {
    "name": "tiny",
    "kind": "ablation",
    "task": {"name": "charlm", "seq_len": 16},
    "model": {"embed_dim": 16, "num_heads": 2, "num_layers": 1},
    "train": {"steps": 10, "batch_size": 8, "warmup_steps": 2, "eval_every": 5, "eval_batches": 2,
              "log_every": 5, "device": "cpu", "threads": 1},
    "scientific": {"model.num_heads": [2, 4]},
    "nuisance": {"train.lr": {"low": 1e-3, "high": 1e-2, "log": True}},
    "points": 1,
    "tune_seeds": 1,
    "seeds": 1,
    "max_extra_points": 0,  # a fixed size: 2 variants x (1 tune + 1 seed) trials
}  # fmt: skip


def tiny(**values: object) -> RunConfig:
    """TINY_RUN with dotted keys changed."""
    return with_values(run_config_from(TINY_RUN), values)


class Recorder:
    """A train callback that records every event; can ask to stop at a step, or raise at a step."""

    def __init__(
        self, stop_at: int | None = None, raise_at: int | None = None, error: BaseException | None = None
    ) -> None:
        self.stop_at, self.raise_at, self.error = stop_at, raise_at, error or RuntimeError("boom")
        self.steps: list[tuple[int, dict]] = []
        self.evals: list[tuple[int, dict]] = []
        self.ends: list = []
        self.derived: dict = {}

    def on_start(self, start) -> None:
        self.derived = start.derived

    def on_step(self, step: int, metrics: dict) -> bool:
        self.steps.append((step, metrics))
        if step == self.raise_at:
            raise self.error
        return step == self.stop_at

    def on_eval(self, step: int, metrics: dict) -> None:
        self.evals.append((step, metrics))

    def on_end(self, result) -> None:
        self.ends.append(result)


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite store with its schema created once: migrations take seconds, a copy milliseconds."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def _data_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Built tasks go to a cache shared by this test session (subprocesses too), never to the user's."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` where torch sees no CUDA device."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)


# ---------------------------------------------------------------------------------------------------------------
# A finished study written straight into real MLflow and Optuna stores (the report's tests)

EVIL = "<script>alert('x')</script>"
LRS = (2e-4, 1.5e-3, 9e-3)
SPEC = {
    "name": "toy",
    "kind": "ablation",
    "description": f"synthetic study {EVIL}",
    "model": {"embed_dim": 32, "num_heads": 2, "num_layers": 1},
    "task": {"name": "recall"},
    "train": {"steps": 100, "eval_every": 25},
    "scientific": {"model.num_heads": [2, 1, 4], "model.attn_dropout": [0.0, 0.1], "model.resid_dropout": [0.0, 0.2]},
    "nuisance": {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}},
    "points": 3,
    "tune_seeds": 1,  # build_ablation writes one tune run per point
    "seeds": 3,
    "margin": 0.03,
}
UNIFORM_LOSS = 4.0  # a diverged seed run's outcome
# variant -> (factor, changes, loss offset, lr optimum): num_heads=4 helps, =1 hurts with its best lr on the edge.
VARIANTS = {
    "base": ("", {}, 0.0, 1.5e-3),
    "model.num_heads=1": ("model.num_heads", {"model.num_heads": 1}, 0.2, 1e-2),
    "model.num_heads=4": ("model.num_heads", {"model.num_heads": 4}, -0.1, 1.5e-3),
    "model.attn_dropout=0.1": ("model.attn_dropout", {"model.attn_dropout": 0.1}, 0.001, 1.5e-3),
    "model.resid_dropout=0.2": ("model.resid_dropout", {"model.resid_dropout": 0.2}, 0.3, 1.5e-3),
}


def _loss(variant: str, lr: float, seed: int) -> float:
    _, _, offset, best_lr = VARIANTS[variant]
    noise = np.random.default_rng(zlib.crc32(f"{variant}/{seed}".encode())).normal(0, 0.005) if seed else 0.0
    return 2.0 + offset + 0.3 * (math.log10(lr) - math.log10(best_lr)) ** 2 + noise


def _png(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1))
    ax.imshow(np.tril(np.ones((8, 8))))
    fig.savefig(path)
    plt.close(fig)
    return path


EMPTY = Path(tempfile.mkdtemp(prefix="ablate-empty-stores-"))
atexit.register(shutil.rmtree, EMPTY, True)
_BUILT: dict[str, tuple] = {}


def _empty_stores() -> None:
    if not (EMPTY / "mlflow.db").is_file():
        MlflowClient(f"sqlite:///{EMPTY / 'mlflow.db'}").search_experiments()
        optuna.storages.RDBStorage(f"sqlite:///{EMPTY / 'optuna.db'}")


class StoreBuilder:
    """Writes a study into real stores through the public MLflow and Optuna APIs."""

    def __init__(self, root: Path, spec: dict) -> None:
        self.spec, self.root = spec, root
        _empty_stores()
        for db in ("optuna.db", "mlflow.db"):  # migrating fresh stores takes seconds: copy empty ones made once
            if (EMPTY / db).is_file() and not (root / db).exists():
                shutil.copy(EMPTY / db, root / db)
        self.storage = f"sqlite:///{root / 'optuna.db'}"
        self.tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
        self.client = MlflowClient(self.tracking_uri)
        self.exp = self.client.create_experiment(spec["name"], artifact_location=(root / "artifacts").as_uri())
        self.study = optuna.create_study(study_name=spec["name"], storage=self.storage, direction="minimize")
        self.parent = self.client.create_run(self.exp, tags={
            names.TAG_STUDY: spec["name"], names.TAG_ROLE: "study", names.TAG_KIND: spec["kind"],
            names.TAG_GIT_COMMIT: "abc1234", names.TAG_GIT_DIRTY: "false", names.TAG_DEVICE: "cpu"}).info.run_id
        self.study.set_user_attr(names.ATTR_KIND, spec["kind"])
        self.study.set_user_attr(names.ATTR_SPEC, spec)
        self.study.set_user_attr(names.ATTR_PARENT_RUN_ID, self.parent)
        self.png = _png(root / "attention_maps.png")
        self.number = 0

    def add(self, variant: str, phase: str, params: dict, seed: int, loss: float, state: str = "completed",
            reason: str = "", factor: str = "", point: int = 0) -> str:
        """One trial and its child run; ``state`` is the trainer's status. Test loss = val loss + 0.01."""
        cfg = with_values(run_config_from(self.spec), {**params, "train.seed": seed})
        flat = flatten(to_dict(cfg))
        heads = cfg.model.num_heads
        tags = {names.TAG_STUDY: self.spec["name"], names.TAG_ROLE: "trial", names.TAG_TRIAL: str(self.number),
                names.TAG_KIND: self.spec["kind"], names.TAG_PHASE: phase, names.TAG_VARIANT: variant,
                names.TAG_FACTOR: factor, names.TAG_STATUS: state, names.TAG_REASON: reason,
                "mlflow.parentRunId": self.parent, names.TAG_DEVICE: "cpu", names.TAG_BACKEND: "sdpa",
                "mlflow.source.git.commit": "abc1234", "torch.version": "2.14.1"}
        run = self.client.create_run(self.exp, tags=tags, run_name=f"{variant}-{self.number}").info.run_id
        ps = [Param(k, str(v)) for k, v in flat.items()]
        ps += [Param("derived.head_dim", str(cfg.model.resolved_head_dim)), Param("derived.params", "20000")]
        params_n = 20000 + 1000 * heads
        ts = int(time.time() * 1000)
        steps = 100 if state == "completed" else 50
        ms = [Metric(names.TRAIN_LOSS, loss + 2.0 * (1 - s / 100), ts, s) for s in range(0, steps + 1, 10)]
        evals = {}
        for s in range(25, steps + 1, 25):
            evals[s] = loss + 0.5 * (1 - s / 100) + (0 if s == 100 else 0.02)
            ms.append(Metric(names.VAL_LOSS, evals[s], ts, s))
            ms.append(Metric("val/acc", 0.9 - loss / 10, ts, s))
            ms += [Metric(names.entropy_metric(0, h), 1.0 + 0.1 * h, ts, s) for h in range(heads)]
            ms.append(Metric(names.max_logit_metric(0), 2.0 + s / 25, ts, s))
        if state == "completed":
            ms += [Metric(k, v, ts, 100) for k, v in {
                names.BEST_VAL_LOSS: min(evals.values()), names.PARAMS: params_n, names.TEST_LOSS: loss + 0.01,
                names.FLOPS_PER_TOKEN: 6 * params_n, names.FLOPS_TOTAL: 6 * params_n * 100 * 32 * 128,
                names.TOKENS_PER_S: 50000 / heads, names.WALL_S: 3.0 * heads, names.PEAK_MEM_MB: 10.0}.items()]
        self.client.log_batch(run, metrics=ms, params=ps)
        if phase in ("seed", "search") and state == "completed":
            self.client.log_artifact(run, str(self.png), "attention")
        if self.number == 0:
            ds = pd.DataFrame({"x": [1, 2, 3]})
            import mlflow.data

            entity = mlflow.data.from_pandas(ds, name="recall/train", digest="d1g3st")._to_mlflow_entity()
            self.client.log_inputs(run, [DatasetInput(entity, [])])
        mlflow_status = {"completed": "FINISHED", "stopped": "KILLED"}.get(state, "FAILED")
        self.client.set_terminated(run, mlflow_status)
        optuna_state = {"completed": TrialState.COMPLETE, "stopped": TrialState.PRUNED}.get(state, TrialState.FAIL)
        dists = {k: self._dist(k) for k in params}
        self.study.add_trial(optuna.trial.create_trial(
            state=optuna_state, value=loss if optuna_state == TrialState.COMPLETE else None,
            params=params, distributions=dists, intermediate_values=evals,
            user_attrs={names.ATTR_RUN_ID: run, names.ATTR_PHASE: phase, names.ATTR_VARIANT: variant,
                        names.ATTR_FACTOR: factor, names.ATTR_SEED: seed, names.ATTR_STATUS: state,
                        names.ATTR_POINT: seed if phase == "seed" else point, **self._outcome(phase, state, loss)}))
        self.number += 1
        return run

    @staticmethod
    def _outcome(phase: str, state: str, loss: float) -> dict:
        if phase != "seed" or state not in ("completed", "diverged"):
            return {}
        return {names.ATTR_OUTCOME: loss + 0.01 if state == "completed" else UNIFORM_LOSS}

    def _dist(self, key: str):
        bare = key.split(".")[-1]  # a study file may name a parameter by its bare field name
        spec = next((section[k] for section in (self.spec.get("nuisance") or {}, self.spec.get("scientific") or {})
                     for k in (key, bare) if k in section), None)
        if isinstance(spec, dict):
            return FloatDistribution(spec["low"], spec["high"], log=spec.get("log", False))
        return CategoricalDistribution(spec)


def build_ablation(root: Path) -> StoreBuilder:
    """4 variants x 3 tune points, then 3 seeds of each best point; one pruned, one failed, one diverged."""
    b = StoreBuilder(root, SPEC)
    for variant, (factor, changes, _, _) in VARIANTS.items():
        for i, lr in enumerate(LRS):
            state = "stopped" if (variant == "model.attn_dropout=0.1" and i == 0) else "completed"
            state = "failed" if (variant == "model.num_heads=4" and i == 0) else state
            b.add(variant, "tune", {**changes, "train.lr": lr}, 0, _loss(variant, lr, 0), state,
                  reason=EVIL if state == "failed" else "", factor=factor, point=i)
    for variant, (factor, changes, _, _) in VARIANTS.items():
        tune = [t for t in b.study.trials if t.user_attrs[names.ATTR_VARIANT] == variant and t.value is not None]
        lr = min(tune, key=lambda t: t.value).params["train.lr"]
        for seed in (1, 2, 3):
            diverged = variant == "model.num_heads=1" and seed == 3
            b.add(variant, "seed", {**changes, "train.lr": lr}, seed, _loss(variant, lr, seed),
                  "diverged" if diverged else "completed", reason="loss 9.1 > 4x initial" if diverged else "",
                  factor=factor)
    return b


def read_table(page: str, table_id: str) -> pd.DataFrame:
    """A table of the page as strings (pandas.read_html needs lxml, which we don't ship)."""
    body = re.search(rf'<table[^>]*id="{table_id}">(.*?)</table>', page, re.S).group(1)
    cells = [re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S) for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]
    return pd.DataFrame(cells[1:], columns=cells[0])


@pytest.fixture(scope="session")
def built_ablation(tmp_path_factory) -> tuple[StoreBuilder, Path, str]:
    """The ablation stores and their report, built once per session (the report and browser tests share them)."""
    if "toy" not in _BUILT:
        from ablate.report import build_report

        builder = build_ablation(tmp_path_factory.mktemp("ablation"))
        out = builder.root / "reports"
        path = build_report("toy", storage=builder.storage, tracking_uri=builder.tracking_uri, out=out)
        _BUILT["toy"] = (builder, path, path.read_text())
    return _BUILT["toy"]


# ---------------------------------------------------------------------------------------------------------------
# Servers of our own: PostgreSQL databases created and dropped per test, a private PostgreSQL instance to stop and
# start, an MLflow tracking server on 127.0.0.1.

PG_SERVER = os.environ.get("ABLATE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_reachable(url: str) -> str:
    try:
        import psycopg

        psycopg.connect(url.replace("+psycopg", ""), connect_timeout=3).close()
    except Exception as err:
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return ""


@contextlib.contextmanager
def pg_database(server_url: str = PG_SERVER) -> Iterator[str]:
    """A database created for one test and dropped after it (WITH (FORCE): leftover sessions do not keep it): a new
    user's empty database, never tables left behind by an earlier run, so a first-use race cannot hide."""
    import psycopg

    reason = _pg_reachable(server_url)
    if reason:
        pytest.skip(f"PostgreSQL not reachable at {server_url} ({reason})")
    server = server_url.replace("+psycopg", "")
    db = f"ablate_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    try:
        yield server_url.rsplit("/", 1)[0] + f"/{db}"
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


@pytest.fixture
def pg_url():
    """A fresh database on the PostgreSQL server of ``$ABLATE_TEST_POSTGRES`` (skipped when unreachable)."""
    with pg_database() as url:
        yield url


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


class PostgresServer:
    """A PostgreSQL instance of its own (``initdb`` in a temp folder, a free port on 127.0.0.1, trust auth), to stop
    and start under a running study. As root, its programs run as the ``postgres`` user (they refuse root)."""

    def __init__(self) -> None:
        self.initdb, self.pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        if not (self.initdb and self.pg_ctl):
            pytest.skip("initdb/pg_ctl not found (PostgreSQL server binaries)")
        self.root = Path(tempfile.mkdtemp(prefix="ablate-pg-"))
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and no postgres user to run initdb as")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.data, self.log = self.root / "data", self.root / "server.log"
        out = self._run([self.initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync",
                         "--no-instructions"])  # fmt: skip
        if out.returncode != 0:
            shutil.rmtree(self.root, ignore_errors=True)
            pytest.skip(f"initdb cannot run here: {(out.stdout + out.stderr).strip().splitlines()[-1:]}")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(self.as_user + cmd, capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        out = self._run([self.pg_ctl, "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "start"])
        assert out.returncode == 0, out.stdout + out.stderr + (self.log.read_text() if self.log.exists() else "")

    def stop(self) -> None:
        """As an operator's restart does: sessions are ended (``-m fast``), clients see their connections drop."""
        self._run([self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def close(self) -> None:
        self._run([self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def private_postgres():
    """A running ``PostgresServer`` (skipped when its binaries are missing or cannot run), shared by a module's
    tests (each in a database of its own, each leaving it running), removed after them."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 and a free port, over a SQLite store in ``root``; can be stopped and started."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        _empty_stores()
        if not (self.root / "mlflow.db").exists():  # migrating a fresh store takes the server seconds: copy one
            shutil.copy(EMPTY / "mlflow.db", self.root / "mlflow.db")
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]  # fmt: skip
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 (the server writes it until stopped)
        self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).close()
                return
            time.sleep(0.5)
        raise AssertionError(f"mlflow server not up in {timeout} s: {(self.root / 'server.log').read_text()[-3000:]}")

    def stop(self) -> None:
        """The whole process group (the server and its workers) killed, as a crash or a host going down would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


class TcpRelay:
    """127.0.0.1:``port`` relayed to 127.0.0.1:``target``, to cut a link as a stopped server does and restore it at
    once. ``cut()`` resets every relayed connection and stops listening (new connections are refused)."""

    def __init__(self, target: int) -> None:
        self.target, self.port = target, free_port()
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._listening = threading.Event()
        self.restore()

    def restore(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the same port again
        listener.settimeout(0.2)
        self._listening.set()
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        self._listening.clear()
        time.sleep(0.5)  # the accept loop closes its listener
        with self._lock:
            for s in self._open:  # shutdown wakes the pump blocked in recv (close alone would not, on Linux)
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()  # linger 0: a reset, as when the server's process dies
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        with listener:
            while self._listening.is_set():
                try:
                    client, _ = listener.accept()
                except TimeoutError:
                    continue
                try:
                    server = socket.create_connection(("127.0.0.1", self.target))
                except OSError:
                    client.close()
                    continue
                with self._lock:
                    self._open += [client, server]
                for a, b in ((client, server), (server, client)):
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


@pytest.fixture
def mlflow_server(tmp_path):
    """A running ``MlflowServer`` with its store in ``tmp_path / "server"``; stopped after the test."""
    root = tmp_path / "server"
    root.mkdir()
    server = MlflowServer(root)
    try:
        server.start()
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------------------------
# Report stores shared by the report and browser tests


def build_search(root: Path, n: int = 10) -> StoreBuilder:
    spec = {**SPEC, "name": "hunt", "kind": "search", "scientific": {"model.num_heads": [1, 2, 4]},
            "nuisance": {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}}, "budget": {"trials": n}}
    b = StoreBuilder(root, spec)
    rng = np.random.default_rng(0)
    for i in range(n):
        heads, lr = int(rng.choice([1, 2, 4])), float(10 ** rng.uniform(-4, -2))
        loss = 2.0 + 1.0 * (math.log10(lr) + 3) ** 2 - 0.02 * heads + rng.normal(0, 0.01)
        b.add("", "search", {"model.num_heads": heads, "train.lr": lr}, 0, loss, "stopped" if i == 3 else "completed")
    return b


_SITES: dict[str, Path] = {}


def study_site(built_ablation) -> Path:
    """A store of five studies and its reports folder, built once: the finished fixture ablation (report built),
    a finished search (report built), an ablation with a trial running and no report yet, a study whose stored file
    no longer loads (its error quotes markup), and one with a name that must never become a path."""
    if "site" not in _SITES:
        toy = built_ablation[0]
        root = toy.root.parent / "site"
        (root / "reports").mkdir(parents=True)
        for db in ("optuna.db", "mlflow.db"):
            shutil.copy(toy.root / db, root / db)
        shutil.copytree(built_ablation[1].parent, root / "reports" / "toy")
        hunt = build_search(root, n=3)
        from ablate.report import build_report

        build_report("hunt", storage=hunt.storage, tracking_uri=hunt.tracking_uri, out=root / "reports", index=False)
        fresh = StoreBuilder(root, {**SPEC, "name": "fresh", "scientific": {"model.num_heads": [2, 4]}})
        fresh.study.enqueue_trial({"train.lr": 1e-3}, user_attrs={
            names.ATTR_PHASE: "tune", names.ATTR_VARIANT: "base", names.ATTR_POINT: 0})
        trial = fresh.study.ask()  # a worker of this machine (this process) holds it
        trial.set_user_attr(names.ATTR_WORKER, f"{socket.gethostname()}:{os.getpid()}")
        optuna.create_study(study_name="weird", storage=hunt.storage).set_user_attr(
            names.ATTR_SPEC, {**SPEC, "name": "weird", "kind": EVIL})
        optuna.create_study(study_name="../evil", storage=hunt.storage)
        _SITES["site"] = root
    return _SITES["site"]


def index_rows(page: str) -> dict[str, list[str]]:
    """The index's rows by study name: each cell's HTML."""
    rows = re.findall(r'<tr class="study" data-study="([^"]*)">(.*?)</tr>', page, re.S)
    return {name: [c.strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", body, re.S)] for name, body in rows}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh directory whose runs/ holds both stores, as on a user's clone."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("ABLATE_STORAGE", raising=False)
    return tmp_path
