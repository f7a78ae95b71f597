"""MLflow tracking against a real SQLite store in tmp_path, read back through MLflow's own client."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from support.runs import TINY_RUN as TINY
from support.runs import Recorder, tiny

from ablate.core import names
from ablate.core.interrupts import STOP_REQUESTED, sigterm_as_interrupt
from ablate.stores.tracking import MLflowTracker, ensure_experiment, git_state
from ablate.training.train import train


@pytest.fixture(autouse=True)
def _stores(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, empty_store: Path
) -> None:
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def client(tmp_path: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def only_run(client: MlflowClient, experiment: str = names.DEFAULT_EXPERIMENT):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return runs[0]


def steps_of(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_a_tracked_run_holds_params_tags_histories_input_and_artifacts(client: MlflowClient, tmp_path: Path) -> None:
    tracker = MLflowTracker(run_name="tiny", tags={names.TAG_ROLE: "run", "team": "attention"})
    result = train(tiny(), [tracker])
    run = only_run(client)
    assert run.info.run_id == tracker.run_id and run.info.status == "FINISHED" and run.info.run_name == "tiny"

    params = run.data.params
    assert params["model.num_heads"] == "2" and params["train.lr"] == "0.003" and params["task.name"] == "recall"
    assert params["derived.head_dim"] == "8" and int(params["derived.params"]) == result.metrics[names.PARAMS]
    assert float(params["derived.flops_per_token"]) > 0 and params["model.head_dim"] == "None"

    tags = run.data.tags
    assert tags[names.TAG_ROLE] == "run" and tags["team"] == "attention" and tags[names.TAG_STATUS] == "completed"
    assert tags[names.TAG_DEVICE] == "cpu" and tags[names.TAG_BACKEND] == "sdpa"
    # the tests run in a git checkout: a real commit, never the "unknown" of a tree outside git
    assert re.fullmatch(r"[0-9a-f]{40}", tags[names.TAG_GIT_COMMIT]) and tags[names.TAG_GIT_DIRTY] in ("true", "false")
    assert tags["torch.version"] and tags["ablate.version"] and names.TAG_REASON not in tags

    for key in (names.TRAIN_LOSS, names.TRAIN_LR, names.TRAIN_GRAD_NORM, names.TOKENS_PER_S):
        assert steps_of(client, run.info.run_id, key) == [5, 10, 15, 20], key  # one point per logged step
    for key in (names.VAL_LOSS, "val/acc", names.entropy_metric(0, 0), names.max_logit_metric(0)):
        assert steps_of(client, run.info.run_id, key) == [10, 20], key
    loss = client.get_metric_history(run.info.run_id, names.VAL_LOSS)
    assert max(loss, key=lambda m: m.step).value == pytest.approx(result.metrics[names.VAL_LOSS])
    for key in (names.BEST_VAL_LOSS, names.TEST_LOSS, "test/acc", names.WALL_S, names.PEAK_MEM_MB, names.FLOPS_TOTAL):
        assert steps_of(client, run.info.run_id, key) == [20], key
    assert run.data.metrics[names.TEST_LOSS] == pytest.approx(result.metrics[names.TEST_LOSS])
    assert float(params["derived.uniform_loss"]) == pytest.approx(result.uniform_loss)

    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "recall" and len(dataset.dataset.digest) > 0
    assert json.loads(dataset.dataset.profile)["num_rows"] == 64  # the whole split, not the schema's sample
    assert "inputs" in dataset.dataset.schema and "targets" in dataset.dataset.schema

    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert files == {"config.yaml", "attention"}
    assert [f.path for f in client.list_artifacts(run.info.run_id, "attention")] == ["attention/attention_maps.png"]
    config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text())
    assert config["model"]["num_heads"] == 2
    png = Path(client.download_artifacts(run.info.run_id, "attention/attention_maps.png", str(tmp_path)))
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "artifacts").is_dir()  # artifacts beside the SQLite store


def test_a_diverging_run_ends_failed_with_a_reason(client: MlflowClient) -> None:
    result = train(tiny(**{"train.lr": 1e4, "train.warmup_steps": 0, "train.grad_clip": 0.0}), [MLflowTracker()])
    run = only_run(client)
    assert result.status == "diverged" and run.info.status == "FAILED"
    assert run.data.tags[names.TAG_STATUS] == "diverged" and "train/loss" in run.data.tags[names.TAG_REASON]


@pytest.mark.parametrize("error,status,ended", [(RuntimeError("disk on fire"), "failed", "FAILED"),
                                                (KeyboardInterrupt(), "interrupted", "KILLED")])  # fmt: skip
def test_a_run_ended_by_an_exception_or_an_interrupt_is_closed(client: MlflowClient, error: BaseException,
                                                               status: str, ended: str) -> None:  # fmt: skip
    with pytest.raises(type(error)):
        train(tiny(), [MLflowTracker(), Recorder(raise_at=10, error=error)])
    run = only_run(client)
    assert run.info.status == ended and run.data.tags[names.TAG_STATUS] == status
    assert type(error).__name__ in run.data.tags[names.TAG_REASON]
    assert steps_of(client, run.info.run_id, names.TRAIN_LOSS) == [5, 10]  # buffered points are not lost


def test_a_stopped_run_ends_killed_nested_under_its_parent(client: MlflowClient) -> None:
    exp = ensure_experiment(client, "demo")
    assert ensure_experiment(client, "demo") == exp
    parent = client.create_run(exp, run_name="demo").info.run_id
    tracker = MLflowTracker(experiment="demo", parent_run_id=parent, tags={names.TAG_ROLE: "trial"})
    result = train(tiny(), [tracker, Recorder(stop_at=15)])
    runs = {r.info.run_id: r for r in client.search_runs([exp])}
    child = runs[tracker.run_id]
    assert result.status == "stopped" and child.info.status == "KILLED"
    assert child.data.tags["mlflow.parentRunId"] == parent and names.TAG_REASON in child.data.tags
    assert steps_of(client, tracker.run_id, names.VAL_LOSS) == [10]


def test_a_checkpoint_is_logged_only_when_asked(client: MlflowClient, tmp_path: Path) -> None:
    import torch

    tracker = MLflowTracker()
    train(tiny(**{"train.checkpoint": True}), [tracker])
    (entry,) = client.list_artifacts(tracker.run_id, "checkpoint")
    assert entry.path == "checkpoint/model.pt"
    state = torch.load(client.download_artifacts(tracker.run_id, entry.path, str(tmp_path)))
    assert "tok_emb.weight" in state


def test_git_state_is_unknown_outside_git(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    def no_git(*args: object, **kwargs: object) -> None:
        raise FileNotFoundError("git")

    git_state.cache_clear()
    monkeypatch.setattr(subprocess, "run", no_git)
    try:
        assert git_state() == ("unknown", "unknown")
    finally:
        git_state.cache_clear()


def test_a_failed_background_write_is_reported_and_the_run_still_ends(
    client: MlflowClient, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def locked(*args: object, **kwargs: object) -> None:
        raise RuntimeError("database is locked")

    tracker = MLflowTracker()
    monkeypatch.setattr(tracker.client, "log_inputs", locked)
    result = train(tiny(), [tracker])
    run = only_run(client)
    assert result.status == "completed" and run.info.status == "FINISHED"
    assert "database is locked" in run.data.tags["ablate.tracking_error"]
    assert "database is locked" in capsys.readouterr().err
    assert steps_of(client, run.info.run_id, names.VAL_LOSS) == [10, 20]  # later writes still happened


def test_large_attention_maps_are_pooled_into_one_small_png(tmp_path: Path) -> None:
    import numpy as np
    from matplotlib.image import imread

    from ablate.stores.figures import save_attention_maps

    small, large = tmp_path / "small.png", tmp_path / "large.png"
    save_attention_maps(np.full((2, 4, 64, 64), 1 / 64), small)
    save_attention_maps(np.full((2, 4, 256, 256), 1 / 256), large)
    # 256 keys pooled 4x4 to the 64-cell limit: the same maps area (only the title, saying so, may be wider)
    assert imread(large).shape[0] == imread(small).shape[0]
    assert imread(large).shape[1] <= max(imread(small).shape[1], 8 * 90)


def test_a_run_failing_before_its_first_step_is_still_recorded(client: MlflowClient) -> None:
    from ablate.core.config import ConfigError

    impossible = tiny(**{"task.num_pairs": 8})  # 8 pairs do not fit in 16 tokens: the task refuses to build
    with pytest.raises(ConfigError):
        train(impossible, [MLflowTracker()])
    run = only_run(client)
    assert run.info.status == "FAILED" and "num_pairs" in run.data.tags[names.TAG_REASON]


def test_bench_tracking_times_the_same_run_with_and_without_the_tracker(tmp_path: Path):
    from ablate.cli import main

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    assert main(["bench", "--tracking", str(config), "--out", str(tmp_path / "bench")]) == 0
    table = (tmp_path / "bench" / "tracking.md").read_text()
    untracked, extra, overhead, spread = table.strip().splitlines()[-1].strip("| ").split(" | ")
    # what the bench measures, not how fast this machine is today: a timed run, the tracker's extra, its share
    assert float(untracked) > 0 and math.isfinite(float(extra)) and overhead.endswith("%") and spread


def test_a_stop_signal_while_the_server_creates_the_run_leaves_one_run(client: MlflowClient, monkeypatch) -> None:
    """SIGTERM (scancel, a preemption) lands while a tracking server is creating the run: the server has made it
    but the tracker has no id yet. The stop waits for the id, so the clean-up ends that run instead of making a
    second one (seen on a Slurm array: a cancelled trial with two runs)."""
    create = MlflowClient.create_run

    def signalled_mid_request(self, *args, **kwargs):
        run = create(self, *args, **kwargs)  # the server has committed the run ...
        os.kill(os.getpid(), signal.SIGTERM)  # ... and the answer is not back yet
        return run

    monkeypatch.setattr(MlflowClient, "create_run", signalled_mid_request)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        train(tiny(), [MLflowTracker()])
    STOP_REQUESTED.clear()  # as a new process would start
    run = only_run(client)
    assert run.info.status == "KILLED" and run.data.tags[names.TAG_STATUS] == "interrupted"
