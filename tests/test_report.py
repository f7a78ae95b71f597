"""The report, built from real MLflow and Optuna SQLite stores filled the way a finished study leaves them."""

from __future__ import annotations

import atexit
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import markupsafe
import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, Metric, Param
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
from scipy import stats

from ablate import names
from ablate.config import flatten, run_config_from, to_dict, with_values

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
    "seeds": 3,
}
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
    noise = np.random.default_rng(zlib.crc32(f"{variant}/{seed}".encode())).normal(0, 0.01) if seed else 0.0
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
            reason: str = "", factor: str = "") -> str:
        """One trial and its child run; ``state`` is the trainer's status."""
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
                names.BEST_VAL_LOSS: min(evals.values()), names.PARAMS: params_n,
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
                        names.ATTR_FACTOR: factor, names.ATTR_SEED: seed}))
        self.number += 1
        return run

    def _dist(self, key: str):
        spec = (self.spec.get("nuisance") or {}).get(key) or (self.spec.get("scientific") or {}).get(key)
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
                  reason=EVIL if state == "failed" else "", factor=factor)
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


def built_ablation(tmp_path_factory) -> tuple[StoreBuilder, Path, str]:
    """The ablation stores and their report, built once per session (the browser test reuses them)."""
    if "toy" not in _BUILT:
        from ablate.report import build_report

        builder = build_ablation(tmp_path_factory.mktemp("ablation"))
        out = builder.root / "reports"
        path = build_report("toy", storage=builder.storage, tracking_uri=builder.tracking_uri, out=out)
        _BUILT["toy"] = (builder, path, path.read_text())
    return _BUILT["toy"]


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    return built_ablation(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def ablation_report(tmp_path_factory):
    return built_ablation(tmp_path_factory)[1:]


def test_importing_the_report_does_not_import_torch():
    code = "import sys, ablate.report, ablate.report.plots, ablate.report.html; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _paired_from_store(builder: StoreBuilder, variant: str) -> tuple[float, float, float]:
    """The paired interval recomputed straight from MLflow: final val/loss of completed seed runs, by train.seed."""
    from scipy import stats

    def losses(v: str) -> dict[str, float]:
        df = builder.client.search_runs(
            [builder.exp], f"tags.`{names.TAG_VARIANT}` = '{v}' and tags.`{names.TAG_PHASE}` = 'seed' "
            f"and tags.`{names.TAG_STATUS}` = 'completed'")
        return {r.data.params["train.seed"]: r.data.metrics[names.VAL_LOSS] for r in df}

    a, b = losses(variant), losses("base")
    seeds = sorted(set(a) & set(b))
    res = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds])
    ci = res.confidence_interval(0.95)
    return float(np.mean([a[s] - b[s] for s in seeds])), float(ci.low), float(ci.high)


def test_report_has_every_section_and_files(ablation_report, ablation):
    path, page = ablation_report
    for section in ("answer", "variants", "isolation", "sensitivity", "health", "curves", "cost", "attention",
                    "provenance"):
        assert f'<section id="{section}">' in page, section
    # isolation, lr, curves, pareto, attention maps, entropy, max logit: every figure rendered, none missing
    assert page.count('<img src="data:image/png;base64,') == 7
    assert "Nothing to plot" not in page
    assert (path.parent / "results.csv").is_file() and (path.parent / "summary.md").is_file()
    logged = {f.path for f in ablation.client.list_artifacts(ablation.parent, "report")}
    assert logged == {"report/index.html", "report/results.csv", "report/summary.md"}


def test_numbers_match_the_stores(ablation_report, ablation):
    _, page = ablation_report
    diff, lo, hi = _paired_from_store(ablation, "model.num_heads=4")
    assert f"{diff:+.4f} [{lo:+.4f}, {hi:+.4f}]" in page
    assert hi < 0  # the fixture's num_heads=4 really is better: the report must call it so
    results = pd.read_csv(ablation_report[0].parent / "results.csv")
    assert len(results) == len(ablation.study.trials)
    assert (results["state"] == "PRUNED").sum() == 1 and (results["status"] == "diverged").sum() == 1
    one = results[results["variant"] == "model.num_heads=1"]
    assert one["status"].value_counts().to_dict() == {"completed": 5, "diverged": 1}
    states = pd.Series([t.state.name for t in ablation.study.trials]).value_counts().sort_index()
    assert f"{len(states.index) and sum(states)} ({', '.join(f'{k} {v}' for k, v in states.items())})" in page


def test_answer_is_generated_from_the_data(ablation_report):
    _, page = ablation_report
    answers = re.findall(r'<div class="choice">(.*?) <span class="badge ([\w-]+)">', page)
    assert answers == [("model.num_heads → 4", "improves"), ("model.attn_dropout → 0", "inconclusive"),
                       ("model.resid_dropout → 0", "keep-base")]
    assert "Keep 0: every other tested value of model.resid_dropout is worse than the base beyond seed noise." in page
    assert "It costs 1.09× the base&#39;s parameters" in page
    assert "Worse than the base: 1 (+0." in page
    # num_heads=1 tuned best at lr 9e-3, the top 10% of [1e-4, 1e-2] on a log scale
    assert "model.num_heads=1: best train.lr = 0.009 is at the high end" in page


def test_run_data_is_html_escaped(ablation_report):
    _, page = ablation_report
    assert EVIL not in page
    # shown as text: the failed trial's reason, the study description in the header and in the study file
    assert page.count(str(markupsafe.escape(EVIL))) >= 3


def test_study_with_only_failed_and_pruned_trials_still_reports(tmp_path):
    from ablate.report import build_report

    b = StoreBuilder(tmp_path, {**SPEC, "name": "broken"})
    b.add("base", "tune", {"train.lr": 1e-3}, 0, 9.0, "stopped")
    b.add("base", "tune", {"train.lr": 1e-2}, 0, 9.0, "diverged", reason="loss is nan")
    b.study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={names.ATTR_VARIANT: "base"}))
    page = build_report("broken", storage=b.storage, tracking_uri=b.tracking_uri, out=tmp_path / "r").read_text()
    assert "No completed seed runs yet: no conclusion." in page
    assert "loss is nan" in page and "No completed run." in page
    health = read_table(page, "health-table")
    assert health.to_dict("records") == [{"group": "base", "trials": "3", "completed": "0", "diverged %": "33.33",
                                          "failed %": "33.33", "pruned %": "33.33"}]


def build_search(root: Path, n: int = 10) -> StoreBuilder:
    spec = {**SPEC, "name": "hunt", "kind": "search", "scientific": {"model.num_heads": [1, 2, 4]},
            "nuisance": {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}}}
    b = StoreBuilder(root, spec)
    rng = np.random.default_rng(0)
    for i in range(n):
        heads, lr = int(rng.choice([1, 2, 4])), float(10 ** rng.uniform(-4, -2))
        loss = 2.0 + 1.0 * (math.log10(lr) + 3) ** 2 - 0.02 * heads + rng.normal(0, 0.01)
        b.add("", "search", {"model.num_heads": heads, "train.lr": lr}, 0, loss, "stopped" if i == 3 else "completed")
    return b


def test_search_study_shows_importances_not_conclusions(tmp_path):
    from ablate.report import build_report

    b = build_search(tmp_path)
    page = build_report("hunt", storage=b.storage, tracking_uri=b.tracking_uri, out=tmp_path / "r").read_text()
    assert '<section id="importance">' in page and 'id="importance-table"' in page
    assert "draws no ablation conclusions" in page and '<div class="answer' not in page
    imp = read_table(page, "importance-table")
    assert imp["param"].iloc[0] == "train.lr"  # the synthetic loss depends on lr far more than on heads
    assert 'alt="interaction heat map"' in page and "Nothing to plot" not in page


def test_report_command_takes_names_files_and_all(tmp_path, monkeypatch, capsys):
    from ablate.cli import main

    b = build_search(tmp_path, n=4)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", b.tracking_uri)
    study_file = tmp_path / "hunt.yaml"
    study_file.write_text(f"name: hunt\nkind: search\nstorage: {b.storage}\n")
    assert main(["report", str(study_file), "--out", "out1"]) == 0
    assert (tmp_path / "out1" / "hunt" / "index.html").is_file()
    monkeypatch.setenv("ABLATE_STORAGE", b.storage)
    assert main(["report", "--all", "--out", "out2"]) == 0
    assert (tmp_path / "out2" / "hunt" / "index.html").is_file()
    assert main(["report", "nope"]) == 2
    assert "no study named 'nope'" in capsys.readouterr().err


def test_report_before_any_study_is_one_line_and_creates_no_store(tmp_path, monkeypatch, capsys):
    from ablate.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ABLATE_STORAGE", raising=False)
    for argv in (["report", "--all"], ["report", "default"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"ablate report: storage: no study store at {tmp_path / 'runs' / 'optuna.db'}; " \
                      "run a study first (make study)"
    assert not (tmp_path / "runs").exists()


def test_report_of_a_real_tiny_study(tmp_path, monkeypatch):
    """The study runner's own stores, not our fixture: the report finds every trial, run and number."""
    from ablate.study import run_study

    spec = yaml.safe_load(Path("studies/smoke.yaml").read_text())
    spec.update(name="real", points=1, seeds=2)
    spec["train"].update(steps=2, eval_every=1, log_every=1)
    (tmp_path / "real.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert run_study(tmp_path / "real.yaml", storage=storage, report=True) == 0
    page = (tmp_path / "reports" / "real" / "index.html").read_text()
    study = optuna.load_study(study_name="real", storage=storage)
    assert f"{len(study.trials)} (COMPLETE {len(study.trials)})" in page
    assert "Nothing to plot" not in page and page.count("<img ") == 7
    results = pd.read_csv(tmp_path / "reports" / "real" / "results.csv")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for row in results.itertuples():
        run = client.get_run(row.run_id)
        assert run.data.metrics[names.VAL_LOSS] == pytest.approx(row.value)
        assert run.data.tags[names.TAG_VARIANT] == row.variant
    base = results[(results["phase"] == "seed") & (results["variant"] == "base")]["value"]
    mean, half = base.mean(), stats.t.ppf(0.975, len(base) - 1) * base.std(ddof=1) / math.sqrt(len(base))
    assert f"{mean:.4f} ± {half:.4f}" in page
