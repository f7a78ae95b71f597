"""A study's outcome in bits per byte (``outcome: bpb``): allowed only where the task scores bits per byte, required
when arms change the tokenizer, the plan digest of every existing study unchanged, and a real tiny lm study whose
trial values, verdict outcomes and report are all in bits per byte."""

from __future__ import annotations

import math

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from support.runs import ROOT, TINY_STUDY

from ablate import cli
from ablate.core import names
from ablate.core.config import ConfigError
from ablate.design.families import load_spec, load_specs
from ablate.runner.study_setup import plan_digest


def corpus(path) -> str:
    """Documents of real text (the standard library's help topics), a row each of a Parquet file."""
    import pydoc_data.topics

    import pyarrow as pa
    import pyarrow.parquet as pq

    topics = pydoc_data.topics.topics
    pq.write_table(pa.table({"text": [topics[key] for key in sorted(topics)[:120]]}), path)
    return str(path)


def lm_study(source: str, **changes: object) -> dict:
    task = {"name": "lm", "source": source, "seq_len": 32, "tokenizer": "bpe", "tokenizer_vocab": 1024,
            "val_fraction": 0.1, "test_fraction": 0.1}  # fmt: skip
    return {**TINY_STUDY, "name": "bytes", "task": task, "outcome": "bpb",
            "scientific": {"task.tokenizer_vocab": [1024, 512]}, **changes}  # fmt: skip


DOCS = {"name": "lm", "source": "python-docs"}


@pytest.mark.parametrize(("study", "words"), [
    ({**TINY_STUDY, "outcome": "bpb"}, "bpb needs a task scored in bits per byte (lm); task charlm allows loss"),
    ({**TINY_STUDY, "task": DOCS, "scientific": {"task.tokenizer_vocab": [1024, 512]}},
     "must be bpb when arms change task.tokenizer_vocab: per-token loss does not compare across tokenizers"),
    ({**TINY_STUDY, "task": DOCS, "scientific": {"tokenizer": ["char", "bpe"]}},
     "must be bpb when arms change task.tokenizer: per-token loss"),
    ({**TINY_STUDY, "task": DOCS, "nuisance": {"task.tokenizer_vocab": {"low": 256, "high": 1024}}},
     "must be bpb when arms change task.tokenizer_vocab"),
    ({**TINY_STUDY, "task": DOCS, "outcome": "bits"}, "unknown value 'bits'; allowed: loss, bpb"),
])  # fmt: skip
def test_a_wrong_outcome_stops_the_study_in_one_line_naming_outcome_before_any_store(tmp_path, monkeypatch, capsys,
                                                                                      study, words):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("ABLATE_STORAGE", raising=False)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    assert cli.main(["study", "s.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "outcome" in err and words in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]  # no runs/, no mlflow.db, no report


def test_a_ladder_of_tokenizers_needs_bpb_too(tmp_path):
    study = {**TINY_STUDY, "task": DOCS,
             "ladder": {"big": {"task.tokenizer_vocab": 1024}, "small": {"task.tokenizer_vocab": 512}}}  # fmt: skip
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    with pytest.raises(ConfigError, match="outcome: must be bpb when arms change task.tokenizer_vocab"):
        load_specs(tmp_path / "s.yaml", preflight=False)


def test_a_loss_in_bits_per_byte_by_hand():
    assert names.in_outcome_units(math.log(1024), "bpb", 0.28) == pytest.approx(10 * 0.28)  # ln V / ln 2 = 10 bits
    assert names.in_outcome_units(1.7, "loss", 0.28) == 1.7  # a loss outcome is the loss itself
    assert names.outcome_label("bpb") == "test/bpb (bits per byte)"
    assert names.outcome_label("bpb", "val", prose=True) == "val/bpb (bits per byte)"
    assert names.outcome_label("loss") == "test/loss" and names.outcome_label("loss", prose=True) == "test loss"


@pytest.mark.parametrize(("study", "digest"), [("default", "4258c6b2"), ("smoke", "4cc0b2d1")])
def test_an_outcome_left_at_loss_keeps_every_existing_plan_digest(tmp_path, study, digest):
    spec = load_spec(ROOT / "studies" / f"{study}.yaml", preflight=False)
    assert spec.outcome == "loss" and plan_digest(spec).startswith(digest)
    data = yaml.safe_load((ROOT / "studies" / f"{study}.yaml").read_text())
    bpb = {**data, "outcome": "bpb", "task": {**data["task"], "name": "lm", "source": "python-docs"}}
    (tmp_path / "bpb.yaml").write_text(yaml.safe_dump(bpb))
    loss = {**bpb, "outcome": "loss"}
    (tmp_path / "loss.yaml").write_text(yaml.safe_dump(loss))
    # the outcome chooses learning rates and decides verdicts: a resume with the other one is another plan
    assert plan_digest(load_spec(tmp_path / "bpb.yaml", preflight=False)) != plan_digest(
        load_spec(tmp_path / "loss.yaml", preflight=False))


def test_a_tiny_lm_study_of_two_tokenizers_is_tuned_and_judged_in_bits_per_byte(tmp_path, monkeypatch, capsys):
    from ablate.runner.study import run_study

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    study = lm_study(corpus(tmp_path / "docs.parquet"), seeds=2)
    (tmp_path / "bytes.yaml").write_text(yaml.safe_dump(study))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert run_study(tmp_path / "bytes.yaml", storage=storage, report=True) == 0
    out = capsys.readouterr().out
    trials = optuna.load_study(study_name="bytes", storage=storage).get_trials()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert {t.user_attrs[names.ATTR_VARIANT] for t in trials} == {"base", "task.tokenizer_vocab=512"}
    for t in trials:
        run = client.get_run(t.user_attrs[names.ATTR_RUN_ID]).data
        assert t.value == pytest.approx(run.metrics["val/bpb"]) and t.value != pytest.approx(run.metrics["val/loss"])
        vocab = int(run.params["task.tokenizer_vocab"])
        per_byte = run.metrics["val/bpb"] / (run.metrics["val/loss"] / math.log(2))  # the run's own tokens per byte
        assert t.user_attrs[names.ATTR_UNIFORM] == pytest.approx(math.log(vocab) / math.log(2) * per_byte)
        if t.user_attrs[names.ATTR_PHASE] == "seed":
            assert t.user_attrs[names.ATTR_OUTCOME] == pytest.approx(run.metrics["test/bpb"])
    page = (tmp_path / "reports" / "bytes" / "index.html").read_text()
    assert "test/bpb (bits per byte) (mean ± 95% CI)" in page and "val/bpb (bits per byte) (mean)" in page
    assert "test loss" not in page and "test/loss" not in page and "val/loss" not in page
    assert "margin of ±0.03 test/bpb (bits per byte)" in out  # the answer, in the terminal too
