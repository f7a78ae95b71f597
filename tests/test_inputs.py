"""Hostile or wrong input: every check that can run before training does, as one line naming the key, exit 2,
nothing written; property tests of the study-file parser; passwords in URLs never shown or stored."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import string
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.runs import ROOT, TINY_RUN
from support.runs import TINY_STUDY as TINY
from support.stores import SPEC, StoreBuilder

from ablate import cli
from ablate.core.config import ConfigError, to_dict
from ablate.core.inputs import MAX_FILE_BYTES, parse_yaml, read_yaml
from ablate.core.urls import redact, redact_text
from ablate.design.families import load_spec
from ablate.design.spec import StudySpec, spec_from_mapping
from ablate.design.study_file import check_name

PASSWORD = "S3cretPw"

# ---------------------------------------------------------------------------------------------------------------
# The table: each case writes its input under tmp and returns (argv, the key the error must name, the file named)

Case = Callable[[Path], tuple[list[str], str, Path | None]]


def study(**changes: object) -> Case:
    """`ablate study` on TINY with top-level keys replaced (None removes one)."""

    def make(tmp: Path) -> tuple[list[str], str, Path]:
        data = {**copy.deepcopy(TINY), **changes}
        path = tmp / "bad.yaml"
        path.write_text(yaml.safe_dump({k: v for k, v in data.items() if v is not None}, sort_keys=False))
        return ["study", str(path)], "", path

    return make


def section(name: str, **changes: object) -> dict:
    return {**TINY[name], **changes}


def raw(content: bytes | str, *extra: str) -> Case:
    """`ablate study` on a file written byte for byte."""

    def make(tmp: Path) -> tuple[list[str], str, Path]:
        path = tmp / "bad.yaml"
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return ["study", str(path), *extra], "", path

    return make


def with_source(make_source: Callable[[Path], str], command: str = "study") -> Case:
    """A charlm task whose ``task.source`` is what ``make_source`` leaves under tmp."""

    def make(tmp: Path) -> tuple[list[str], str, Path]:
        source = make_source(tmp)
        if command == "train":
            return train(task={"name": "charlm", "seq_len": 16, "source": source})(tmp)
        return study(task={"name": "charlm", "seq_len": 16, "source": source})(tmp)

    return make


def train(**sections: dict) -> Case:
    """`ablate train` on TINY_RUN with sections replaced."""

    def make(tmp: Path) -> tuple[list[str], str, Path]:
        path = tmp / "run.yaml"
        path.write_text(yaml.safe_dump({**copy.deepcopy(TINY_RUN), **sections}))
        return ["train", str(path)], "", path

    return make


def file_at(tmp: Path, name: str, content: bytes) -> str:
    (tmp / "data").mkdir(exist_ok=True)
    (tmp / "data" / name).write_bytes(content)
    return str(tmp / "data" / name)


def folder_without_txt(tmp: Path) -> str:
    (tmp / "corpus").mkdir()
    (tmp / "corpus" / "notes.md").write_text("text, but not .txt")
    return str(tmp / "corpus")


def hostile_store(name: str) -> Case:
    """`ablate report --all` on a store that holds a study named ``name`` (a shared store can hold any name)."""

    def make(tmp: Path) -> tuple[list[str], str, None]:
        storage = f"sqlite:///{tmp / 'shared' / 'optuna.db'}"
        (tmp / "shared").mkdir()
        optuna.create_study(study_name=name, storage=storage)
        return ["report", "--all", "--storage", storage], "", None

    return make


def alias_bomb(levels: int = 12) -> str:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nname: bomb\ndescription: *a{levels - 1}\n"


TINY_TEXT = yaml.safe_dump(TINY, sort_keys=False)
HUGE = 10**6

CASES: dict[str, tuple[Case, str]] = {
    # names: a single safe path component (reports/<name>/, lock files, MLflow experiments)
    "name_dotdot": (study(name=".."), "name"),
    "name_dot": (study(name="."), "name"),
    "name_slash": (study(name="../../etc/evil"), "name"),
    "name_absolute": (study(name="/tmp/evil"), "name"),
    "name_too_long": (study(name="x" * 300), "name"),
    "name_newline": (study(name="a\nb"), "name"),
    "name_not_text": (study(name=["a", "b"]), "name"),
    # the file itself
    "file_missing": (lambda tmp: (["study", str(tmp / "nope.yaml")], "", tmp / "nope.yaml"), "file"),
    "file_is_a_folder": (lambda tmp: (["study", str(tmp)], "", tmp), "file"),
    "file_too_large": (raw(TINY_TEXT + "#" * MAX_FILE_BYTES + "\n"), "file"),
    "file_latin1": (raw(TINY_TEXT.encode() + "description: caf\xe9\n".encode("latin-1")), "file"),
    "file_utf16": (raw(TINY_TEXT.encode("utf-16")), "file"),
    "file_binary": (raw(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))), "file"),
    "file_not_yaml": (raw("name: [unclosed\n"), "yaml"),
    "file_a_list": (raw("- name: tiny\n"), "file"),
    "file_empty": (raw(""), "file"),
    "yaml_alias_bomb": (raw(alias_bomb()), "a1[0]"),
    "yaml_alias_in_values": (raw(TINY_TEXT + "x: &h 2\n".replace("x", "points") + "seeds: *h\n"), "seeds"),
    "yaml_merge_key": (raw("name: tiny\nbase: &b {steps: 5}\ntrain:\n  <<: *b\n"), "train.<<"),
    "yaml_too_deep": (raw("description: " + "[" * 200 + "]" * 200 + "\n"), "description"),
    "yaml_int_too_long": (raw(TINY_TEXT + "points: " + "9" * 5000 + "\n"), "yaml"),
    "yaml_bad_date": (raw(TINY_TEXT + "description: 2024-13-45\n"), "yaml"),
    # values
    "unknown_key": (study(epochs=3), "epochs"),
    "unknown_key_with_newline": (raw(TINY_TEXT + '"evil\\nkey": 1\n'), "evil\\nkey"),
    "wrong_type": (study(points="four"), "points"),
    "int_beyond_int64": (study(model=section("model", embed_dim=2**70)), "model.embed_dim"),
    "margin_infinite": (raw(TINY_TEXT + "margin: .inf\n"), "margin"),
    "lr_nan": (raw(TINY_TEXT.replace("train:\n", "train:\n  lr: .nan\n", 1)), "train.lr"),
    "range_to_infinity": (raw(TINY_TEXT + "nuisance: {train.lr: {low: 0.001, high: .inf, log: true}}\n"),
                          "nuisance.train.lr.high"),  # fmt: skip
    "bad_seeds": (study(seeds={"min": 4, "max": 3}), "seeds.max"),
    "seeds_absurd": (study(seeds=HUGE), "seeds"),
    "workers_absurd": (study(workers=HUGE), "workers"),
    "points_absurd": (study(points=HUGE), "points"),
    "zero_margin": (study(margin=0), "margin"),
    "scientific_not_scalars": (study(scientific={"model.num_heads": [[2], {"a": 1}]}), "scientific.model.num_heads"),
    # task.source, found before any store
    "source_missing": (with_source(lambda tmp: str(tmp / "missing.txt")), "task.source"),
    "source_empty": (with_source(lambda tmp: file_at(tmp, "empty.txt", b" \n\t\n")), "task.source"),
    "source_binary": (with_source(lambda tmp: file_at(tmp, "zeros.txt", bytes(4096))), "task.source"),
    "source_not_utf8": (with_source(lambda tmp: file_at(tmp, "latin.txt", "caf\xe9 " .encode("latin-1") * 50)),
                        "task.source"),  # fmt: skip
    "source_folder_without_txt": (with_source(folder_without_txt), "task.source"),
    "source_hf_unknown_offline": (with_source(lambda tmp: "hf:nosuchuser/nosuchdataset"), "task.source"),
    "source_hf_empty_name": (with_source(lambda tmp: "hf:"), "task.source"),
    "source_path_too_long": (with_source(lambda tmp: "x/" * 3000), "task.source"),
    "threads_absurd": (study(train=section("train", threads=HUGE)), "train.threads"),
    # sizes that cannot fit in memory, or cannot be generated
    "embed_dim_huge": (study(model=section("model", embed_dim=HUGE)), "model.embed_dim"),
    "embed_dim_huge_variant": (study(scientific={"model.embed_dim": [16, HUGE]}), "scientific.model.embed_dim"),
    "batch_size_huge": (study(train=section("train", batch_size=10**9)), "train.batch_size"),
    "seq_len_huge": (study(task={"name": "recall", "seq_len": 10**7, "num_pairs": 2, "vocab_size": 8}),
                     "task.seq_len"),  # fmt: skip
    "rows_huge": (study(task={"name": "recall", "seq_len": 16, "num_pairs": 2, "vocab_size": 8,
                              "num_train": 10**12}), "task.num_train"),  # fmt: skip
    "listops_too_deep": (study(task={"name": "listops", "max_depth": 40, "max_args": 10}), "task.max_depth"),
    "recall_too_many_pairs": (study(task={"name": "recall", "seq_len": 16, "num_pairs": 8}), "task.num_pairs"),
    # --set overrides are YAML too
    "set_alias": (raw(TINY_TEXT, "--set", "model.embed_dim=*a"), "--set"),
    "set_not_yaml": (raw(TINY_TEXT, "--set", "model.embed_dim=[1"), "--set"),
    "set_infinite": (raw(TINY_TEXT, "--set", "train.lr=.inf"), "train.lr"),
    # ablate train: the same checks on a run config
    "train_embed_dim_huge": (train(model={"embed_dim": HUGE, "num_heads": 2, "num_layers": 1}), "model.embed_dim"),
    "train_source_missing": (with_source(lambda tmp: str(tmp / "missing.txt"), "train"), "task.source"),
    "train_not_utf8": (lambda tmp: train()(tmp)[:2] + (_latin1(tmp / "run.yaml"),), "file"),
    # ablate report: names from the command line and from a shared store
    "report_name_dotdot": (lambda tmp: (["report", ".."], "", None), "name"),
    "report_name_path": (lambda tmp: (["report", "../../evil"], "", None), "name"),
    "report_store_dotdot": (hostile_store(".."), "name"),
    "report_store_path": (hostile_store("../../../evil"), "name"),
    "report_store_absolute": (hostile_store("/tmp/ablate-evil"), "name"),
}


def _latin1(path: Path) -> Path:
    path.write_bytes(path.read_bytes() + "description: caf\xe9\n".encode("latin-1"))
    return path


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A cwd whose stores, were anything written, would land under tmp_path; hf datasets offline."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'stores' / 'mlflow.db'}")
    monkeypatch.setenv("ABLATE_STORAGE", f"sqlite:///{tmp_path / 'stores' / 'optuna.db'}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True, raising=False)
    return tmp_path


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_hostile_input_is_one_line_naming_the_key_exit_2_nothing_written(case, sandbox, capsys):
    make, key = CASES[case]
    argv, _, named = make(sandbox)
    before = snapshot(sandbox)
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert f": {key}:" in lines[0], lines[0]
    if named is not None:
        assert str(named) in lines[0], lines[0]
    assert snapshot(sandbox) == before, "something was written"
    assert not (sandbox / "stores").exists() and not (sandbox / "work" / "reports").exists()
    assert len(lines[0]) < 800


def test_the_checks_before_a_study_do_not_import_torch():
    """The report loads study files with the same code: spec, preflight and the task checks stay torch-free."""
    default, gpu = (str(ROOT / "studies" / f"{name}.yaml") for name in ("default", "gpu"))
    code = ("import sys; from ablate.design.families import load_spec; "
            "from ablate.design.preflight import load_run_config; "
            f"load_spec({default!r}); load_run_config({gpu!r}); print('torch' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_hostile_name_in_a_store_does_not_stop_the_other_reports(tmp_path, monkeypatch, capsys):
    import ablate.report

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    hostile = ("..", ".", "../..", "../../escaped", "/tmp/ablate-escaped", "good/../../escaped", "x" * 101)
    for name in ("good", *hostile):
        optuna.create_study(study_name=name, storage=storage)
    built = []
    monkeypatch.setattr(ablate.report, "build_report", lambda name, **kw: built.append(name) or Path(name))
    assert cli.main(["report", "--all", "--storage", storage]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == len(hostile) and all("skipped" in line and ": name:" in line for line in err), err
    assert built == ["good"]


# ---------------------------------------------------------------------------------------------------------------
# Passwords


def test_a_password_in_storage_or_tracking_urls_is_never_shown_or_stored(tmp_path, monkeypatch, capsys):
    """The storage URL given to `ablate report --storage`, the study file's storage and tracking_uri, a URL in
    its description and in a failure's reason: none of their passwords reaches the report, its MLflow artifacts
    or the stored study file."""
    pg = f"postgresql+psycopg://ablate:{PASSWORD}@db.example:5432/ablate"
    http = f"http://admin:{PASSWORD}@mlflow.example:5000"
    study_file = tmp_path / "toy.yaml"
    study_file.write_text(yaml.safe_dump({**SPEC, "storage": pg, "tracking_uri": http,
                                          "description": f"stores at {pg}"}))  # fmt: skip
    spec = load_spec(study_file, preflight=False)
    assert spec.storage == pg and spec.tracking_uri == http  # the runner still connects with them
    assert PASSWORD not in spec.text + json.dumps(spec.data) + spec.description
    assert spec.digest == hashlib.sha256(study_file.read_bytes()).hexdigest()  # of the file as written
    root = tmp_path / "stores"
    root.mkdir()
    b = StoreBuilder(root, spec.data)  # the stored copy, as the runner stores it
    for i, lr in enumerate((1e-3, 3e-3, 1e-2)):
        b.add("base", "tune", {"train.lr": lr}, 0, 2.0 + i / 10, point=i,
              state="failed" if i == 2 else "completed", reason=f"could not reach {pg}")  # fmt: skip
    for seed in (1, 2):
        b.add("base", "seed", {"train.lr": 1e-3}, seed, 2.0 + seed / 100)

    import ablate.report
    import ablate.report.study_page

    real = ablate.report.study_page.load_study

    def load_as_if_remote(name, storage, tracking_uri):  # the real stores, reached through password URLs
        data = real(name, b.storage, b.tracking_uri)
        data.storage, data.tracking_uri = storage, http
        return data

    monkeypatch.setattr(ablate.report.study_page, "load_study", load_as_if_remote)
    real_index = ablate.report.build_index
    monkeypatch.setattr(ablate.report, "build_index", lambda stores, out: real_index([b.storage], out))
    real_families = ablate.report.families
    monkeypatch.setattr(ablate.report, "families", lambda storage: real_families(b.storage))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["report", "toy", "--storage", pg, "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr()
    assert PASSWORD not in out.out + out.err
    page = (tmp_path / "out" / "toy" / "index.html").read_text()
    assert "ablate:***@db.example" in page and "admin:***@mlflow.example" in page
    # the report files, their copies in MLflow's artifacts, the Optuna store (mlflow.db holds the failure reason as
    # this fixture wrote it, raw, as a trainer's exception message might)
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and p not in (study_file, root / "mlflow.db")
             and PASSWORD.encode() in p.read_bytes()]  # fmt: skip
    assert not leaks, leaks


def test_a_stored_tracking_uri_without_its_password_asks_for_the_real_one(tmp_path, monkeypatch):
    from ablate.report.load import load_study

    b = StoreBuilder(tmp_path, {**SPEC, "tracking_uri": "http://admin:***@mlflow.example:5000"})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match=r"^tracking_uri: study 'toy' .*set MLFLOW_TRACKING_URI"):
        load_study("toy", b.storage)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", b.tracking_uri)
    assert load_study("toy", b.storage).tracking_uri == b.tracking_uri


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql+psycopg://u:pw@h:5432/db", "postgresql+psycopg://u:***@h:5432/db"),
    ("postgresql://u:p%40ss@h/db", "postgresql://u:***@h/db"),
    ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),  # an unescaped @ in the password
    ("postgresql://u:pa/ss@h/db", "postgresql://u:***@h/db"),
    ("postgresql://u@h/db?sslmode=require&password=pw", "postgresql://u@h/db?sslmode=require&password=***"),
    ("http://u:pw@h:5000/x?y=1", "http://u:***@h:5000/x?y=1"),
    ("http://u:p/w@h/x", "http://u:***@h/x"),
    ("https://h:5000/#/experiments/1/runs?orderByKey=a", "https://h:5000/#/experiments/1/runs?orderByKey=a"),
    ("sqlite:////tmp/a:b@c.db", "sqlite:////tmp/a:b@c.db"),
    ("postgresql://h/db", "postgresql://h/db"),
])  # fmt: skip
def test_redact(url, shown):
    assert redact(url) == shown
    assert redact(shown) == shown


# ---------------------------------------------------------------------------------------------------------------
# Property tests of the study-file parser

FIELDS = ["name", "kind", "description", "task", "model", "train", "scientific", "nuisance", "points", "seeds",
          "margin", "alpha", "max_extra_points", "budget", "sampler", "pruner", "storage", "tracking_uri",
          "heartbeat", "workers", "embed_dim", "num_heads", "head_dim", "lr", "low", "high", "log", "min", "max",
          "model.num_heads", "train.lr", "seq_len", "source", "trials", "timeout"]  # fmt: skip
PATHS = ["name", "kind", "points", "seeds", "margin", "alpha", "max_extra_points", "sampler", "pruner", "heartbeat",
         "workers", "budget", "description", "model", "model.embed_dim", "model.num_heads", "model.head_dim",
         "model.scaling", "model.attn_dropout", "task", "task.name", "task.seq_len", "task.source", "train",
         "train.lr", "train.steps", "train.batch_size", "scientific", "scientific.model.num_heads",
         "scientific.lr", "nuisance", "nuisance.train.lr", "nuisance.train.lr.low", "nuisance.train.lr.high",
         "nuisance.train.lr.log", "seeds.min", "seeds.max", "budget.trials", "budget.timeout"]  # fmt: skip
SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(-(2**70), 2**70) | st.floats()
           | st.text(max_size=12) | st.sampled_from(["sqrt", "halton", "search", "charlm", "1e-3", "..", "hf:"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=4),
                      max_leaves=12)  # fmt: skip
EXAMPLES = int(os.environ.get("ABLATE_EXAMPLES", "100"))  # ABLATE_EXAMPLES=5000 for a deeper search
FAST = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(FAST, max_examples=max(1, EXAMPLES * 3 // 10))  # each example parses a study three times


def _mutated(changes: list[tuple[str, object]]) -> dict:
    data = copy.deepcopy(TINY)
    for path, value in changes:
        node = data
        *parents, last = path.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = value
    return data


@FAST
@given(st.lists(st.tuples(st.sampled_from(PATHS), VALUES), min_size=1, max_size=4))
def test_any_edit_of_a_study_parses_or_is_a_config_error(changes):
    data = _mutated(changes)
    try:
        spec = spec_from_mapping(data)
    except ConfigError as err:
        assert "\n" not in str(err) and len(str(err)) < 1000
        return
    assert isinstance(spec, StudySpec) and spec.variants()[0].name == "base"


@FAST
@given(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), VALUES, max_size=6))
def test_any_mapping_parses_or_is_a_config_error(data):
    try:
        spec_from_mapping(data)
    except ConfigError as err:
        assert "\n" not in str(err)


YAMLISH = st.lists(st.sampled_from(["a", "name", ":", " ", "\n", "  ", "- ", "[", "]", "{", "}", ",", "&x ", "*x",
                                    "<<: ", "!!python/object:os.system ", "1", "1e3", ".inf", "'", '"', "#", "?",
                                    "|", ">", "~", "\t", "%YAML 1.1\n", "---\n", "\\u0000", "é", "\x00", "\ufeff"]),
                   max_size=40).map("".join)  # fmt: skip


@FAST
@given(YAMLISH | st.text(max_size=200))
def test_any_text_is_a_value_or_a_config_error(text):
    try:
        parse_yaml(text, "t.yaml")
    except ConfigError as err:
        assert "\n" not in str(err) and str(err).startswith("t.yaml: ")


@FAST
@given(st.binary(max_size=300) | YAMLISH.map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_any_file_is_a_mapping_or_a_config_error(tmp_path_factory, content):
    path = tmp_path_factory.getbasetemp() / "any.yaml"
    path.write_bytes(content)
    try:
        assert isinstance(read_yaml(path), dict)
    except ConfigError as err:
        assert "\n" not in str(err) and str(path) in str(err)


@st.composite
def valid_studies(draw) -> dict:
    """Study mappings that must parse: random factors, values, ranges and plan rules around TINY."""
    scientific = {}
    if draw(st.booleans()):
        scientific["model.num_heads"] = draw(st.lists(st.sampled_from([1, 2, 4, 8, 16]), min_size=1, max_size=4))
    if draw(st.booleans()):
        scientific["attn_dropout"] = draw(st.lists(st.floats(0, 0.9), min_size=1, max_size=3))
    if draw(st.booleans()) or not scientific:
        scientific["model.scaling"] = draw(st.lists(st.sampled_from(["sqrt", "inverse", "none", "learned",
                                                                     "qknorm", "logn"]), min_size=1, max_size=6))
    low = draw(st.floats(1e-6, 1e-2))
    nuisance = {"train.lr": {"low": low, "high": low * draw(st.floats(1.01, 1e3)), "log": draw(st.booleans())}}
    seeds = draw(st.integers(1, 8) | st.builds(lambda a, b: {"min": a, "max": a + b}, st.integers(1, 5),
                                               st.integers(0, 5)))  # fmt: skip
    return {**copy.deepcopy(TINY), "name": draw(st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,30}", fullmatch=True)),
            "scientific": scientific, "nuisance": nuisance if draw(st.booleans()) else {},
            "points": draw(st.integers(1, 6)), "seeds": seeds, "margin": draw(st.floats(1e-4, 1.0)),
            "alpha": draw(st.floats(1e-3, 0.49)), "max_extra_points": draw(st.integers(0, 4))}  # fmt: skip


def _same(a: StudySpec, b: StudySpec) -> None:
    assert a.name == b.name and a.base == b.base and a.scientific == b.scientific and a.nuisance == b.nuisance
    assert [v.name for v in a.variants()] == [v.name for v in b.variants()]
    assert (a.points, a.min_seeds, a.max_seeds, a.margin, a.alpha) == (b.points, b.min_seeds, b.max_seeds, b.margin,
                                                                       b.alpha)  # fmt: skip


@SLOW
@given(valid_studies())
def test_valid_studies_round_trip_and_give_variants_base_first(data):
    spec = spec_from_mapping(data)
    variants = spec.variants()
    assert variants[0].name == "base" and variants[0].factor == ""
    assert len({v.name for v in variants}) == len(variants) == 1 + sum(len(v) - 1 for v in spec.scientific.values())
    flat_base = {key: spec.base_value(key) for key in spec.scientific}
    assert all(values[0] == flat_base[key] for key, values in spec.scientific.items())  # the base value first
    for v in variants[1:]:
        assert v.values[v.factor] != flat_base[v.factor]
    _same(spec, spec_from_mapping(parse_yaml(yaml.safe_dump(data, sort_keys=False))))  # written and read back
    _same(spec, spec_from_mapping(json.loads(json.dumps(spec.data, default=str))))  # the stored copy the report reads
    assert to_dict(spec.base) == to_dict(spec_from_mapping(spec.data).base)


@FAST
@given(st.text(max_size=120))
def test_an_accepted_study_name_is_one_path_component(name):
    try:
        check_name(name)
    except ConfigError:
        return
    assert os.sep not in name and name not in (".", "..") and "\n" not in name
    assert (Path("/reports") / name).resolve().parent == Path("/reports")


PASSWORDS = st.text(alphabet=string.ascii_letters + string.digits + "!$%&()*+,;=-._~:/?#[]@", min_size=1, max_size=16)


@FAST
@given(PASSWORDS, st.sampled_from(["postgresql+psycopg://user:{}@db:5432/ablate", "mysql://u:{}@h/db",
                                   "http://admin:{}@mlflow:5000", "https://a:{}@h/x?y=1"]))  # fmt: skip
def test_a_password_never_survives_redact(password, template):
    secret = f"Zq9{password}"
    url = template.format(secret)
    assert secret not in redact(url)
    assert secret not in redact_text(f"storage: {url}  # comment")
    assert redact(redact(url)) == redact(url)
