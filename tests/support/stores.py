"""Finished studies written into real MLflow and Optuna stores with the runner's own names (trial tags, run names,
statuses from ``ablate.core.names``), for the report's tests: an ablation, a search, and a site of several studies."""

from __future__ import annotations

import atexit
import math
import os
import re
import shutil
import socket
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, Metric, Param
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from ablate.core import names
from ablate.core.config import flatten, run_config_from, to_dict, with_values

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




def empty_stores() -> None:
    if not (EMPTY / "mlflow.db").is_file():
        MlflowClient(f"sqlite:///{EMPTY / 'mlflow.db'}").search_experiments()
        optuna.storages.RDBStorage(f"sqlite:///{EMPTY / 'optuna.db'}")


class StoreBuilder:
    """Writes a study into real stores through the public MLflow and Optuna APIs."""

    def __init__(self, root: Path, spec: dict) -> None:
        self.spec, self.root = spec, root
        empty_stores()
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
        tags = {**names.trial_tags(self.spec["name"], self.spec["kind"], self.number, phase, variant, factor),
                names.TAG_STATUS: state, names.TAG_REASON: reason,
                "mlflow.parentRunId": self.parent, names.TAG_DEVICE: "cpu", names.TAG_BACKEND: "sdpa",
                "mlflow.source.git.commit": "abc1234", "torch.version": "2.14.1"}
        run_name = names.trial_run_name(self.number, phase, variant)  # the runner's identity, not a copy of it
        run = self.client.create_run(self.exp, tags=tags, run_name=run_name).info.run_id
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
        optuna_name, mlflow_status = names.STATUSES[state]  # the runner's one table of statuses
        self.client.set_terminated(run, mlflow_status)
        optuna_state = TrialState[optuna_name]
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
