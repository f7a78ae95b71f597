"""The study file (``studies/*.yaml``) as a typed, frozen spec, validated before any store is touched, and its plan.

A study names the parameters it asks about (``scientific``: values to compare), the ones re-tuned for every
scientific value (``nuisance``: ranges explored with scrambled Halton points) and fixes the rest (the base
``model``/``task``/``train``), in the terms of Google's Deep Learning Tuning Playbook.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scipy.stats import qmc

from ablate.config import (
    RUN_SECTIONS,
    ConfigError,
    RunConfig,
    flatten,
    read_yaml,
    run_config_from,
    to_dict,
    with_values,
)

KINDS = ("ablation", "search")
SAMPLERS = ("tpe", "random", "halton")
PRUNERS = ("none", "median", "hyperband")
HALTON_SEED = 0  # the same nuisance points for every variant, and for every run of the same study file
MAX_SEARCH_COMBINATIONS = 100_000
TOP_KEYS = (
    "name", "kind", "task", "model", "train", "scientific", "nuisance", "points", "seeds", "budget",
    "sampler", "pruner", "storage", "tracking_uri", "heartbeat", "workers", "description",
)  # fmt: skip


@dataclass(frozen=True)
class Nuisance:
    """A parameter re-tuned for every scientific value, drawn from ``[low, high]`` (log-uniform when ``log``)."""

    key: str
    low: float
    high: float
    log: bool = False
    integer: bool = False

    def value_at(self, u: float) -> float | int:
        """The point at quantile ``u`` in [0, 1)."""
        if self.log:
            value = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        else:
            value = self.low + u * (self.high - self.low)
        return int(min(self.high, math.floor(value + 0.5))) if self.integer else float(value)


@dataclass(frozen=True)
class Variant:
    """``base``, or the base with one scientific parameter changed (``model.num_heads=8``)."""

    name: str
    factor: str  # the changed key, "" for base
    values: dict[str, Any]  # every scientific key -> its value in this variant


@dataclass(frozen=True)
class PlannedTrial:
    phase: str  # "tune" or "seed" (ablation), "arm" (search: one per variant first)
    variant: Variant
    point: int  # tune: the Halton point's index; seed: train.seed
    params: dict[str, Any]  # what is enqueued: scientific values (+ nuisance values for tune)


@dataclass(frozen=True)
class StudySpec:
    name: str
    kind: str
    base: RunConfig
    scientific: dict[str, tuple]  # dotted key -> values to compare, base value first
    nuisance: tuple[Nuisance, ...]
    points: int = 4
    seeds: int = 2
    trials: int | None = None
    """search: total trials in the study. Ablation plans have a fixed size (see ``plan``)."""
    timeout: float | None = None
    sampler: str = "tpe"
    pruner: str = "none"
    storage: str | None = None
    tracking_uri: str | None = None
    heartbeat: int = 10
    """Seconds between a running trial's heartbeats; a trial silent for 3x this long is failed and retried."""
    workers: int = 1
    """Worker processes on this machine when ``--workers`` is not given; torch threads are split between them."""
    source: str = ""
    text: str = ""  # the study file as written (logged as an artifact)
    data: dict = dataclasses.field(default_factory=dict)  # the mapping as loaded (stored in the study's user attrs)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def base_value(self, key: str) -> Any:
        return flatten(to_dict(self.base))[key]

    def variants(self) -> list[Variant]:
        base_values = {key: values[0] for key, values in self.scientific.items()}
        out = [Variant("base", "", base_values)]
        for key, values in self.scientific.items():
            out += [Variant(f"{key}={fmt(v)}", key, {**base_values, key: v}) for v in values[1:]]
        return out

    def halton(self, n: int) -> list[dict[str, Any]]:
        """``n`` scrambled Halton points over the nuisance ranges; the same for every variant."""
        if not self.nuisance:
            return [{} for _ in range(n)]
        sample = qmc.Halton(d=len(self.nuisance), scramble=True, seed=HALTON_SEED).random(n)
        return [{p.key: p.value_at(float(u)) for p, u in zip(self.nuisance, row, strict=True)} for row in sample]

    def plan(self) -> list[PlannedTrial]:
        """The trials enqueued when the study is created, in the order workers take them.

        Ablation: tune trials point-major (point 0 of every variant, then point 1, ...) so that a study cut short
        by a timeout still gives every variant the same number of points; then ``seeds`` seed trials per variant,
        whose nuisance values are filled in when they start (the best tune point of their variant).
        Search: one trial per variant at the first Halton point, so that no arm is starved by the sampler.
        """
        variants = self.variants()
        if self.kind == "search":
            first = self.halton(1)[0]
            return [PlannedTrial("arm", v, 0, {**v.values, **first}) for v in variants]
        tune = [
            PlannedTrial("tune", v, i, {**v.values, **point})
            for i, point in enumerate(self.halton(self.points))
            for v in variants
        ]
        seed = [PlannedTrial("seed", v, s, dict(v.values)) for s in range(1, self.seeds + 1) for v in variants]
        return tune + seed


def fmt(value: Any) -> str:
    """A value as written in YAML: ``null``, ``true``, ``0.1``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


# ---------------------------------------------------------------------------------------------------------------
# Loading and validating


def load_spec(path: str | Path, overrides: list[str] = ()) -> StudySpec:
    """The study file at ``path``, validated; every problem is a one-line ConfigError naming the file and key."""
    source = str(path)
    data = read_yaml(path)
    try:
        return _build(data, overrides, source, Path(path).read_text())
    except ConfigError as err:
        raise err.at(source) from None


def _build(data: dict, overrides: list[str], source: str, text: str) -> StudySpec:
    for key in data:
        if key not in TOP_KEYS:
            raise ConfigError(str(key), f"unknown key; allowed: {', '.join(TOP_KEYS)}")
    name = _get(data, "name", str, None)
    if not name or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError("name", f"must be a non-empty name of letters, digits, '_', '.', '-', got {name!r}")
    kind = _choice(data, "kind", KINDS, "ablation")
    base = run_config_from(data, overrides, source)
    fields = flatten(to_dict(base))
    scientific = _scientific(data.get("scientific"), base, fields)
    nuisance = _nuisance(data.get("nuisance"), base, fields, scientific)
    budget = data.get("budget") or {}
    if not isinstance(budget, dict):
        raise ConfigError("budget", f"must be a mapping with trials and/or timeout, got {budget!r}")
    for key in budget:
        if key not in ("trials", "timeout"):
            raise ConfigError(f"budget.{key}", "unknown key; allowed: trials, timeout")
    spec = StudySpec(
        name=name,
        kind=kind,
        base=base,
        scientific=scientific,
        nuisance=nuisance,
        points=_positive(data, "points", 4),
        seeds=_positive(data, "seeds", 2),
        trials=_positive(budget, "trials", None, "budget.trials"),
        timeout=_get(budget, "timeout", float, None, "budget.timeout"),
        sampler=_choice(data, "sampler", SAMPLERS, "tpe" if kind == "search" else "halton"),
        pruner=_choice(data, "pruner", PRUNERS, "median" if kind == "search" else "none"),
        storage=_get(data, "storage", str, None),
        tracking_uri=_get(data, "tracking_uri", str, None),
        heartbeat=_positive(data, "heartbeat", 10),
        workers=_positive(data, "workers", 1),
        source=source,
        text=text,
        data=data,
    )
    _check_kind(spec)
    return spec


def _check_kind(spec: StudySpec) -> None:
    if spec.timeout is not None and spec.timeout <= 0:
        raise ConfigError("budget.timeout", f"must be > 0 seconds, got {spec.timeout}")
    if spec.kind == "ablation":
        if spec.pruner != "none":
            raise ConfigError("pruner", "an ablation never prunes (every value gets the same budget); use none")
        if spec.sampler != "halton":
            raise ConfigError("sampler", "an ablation explores nuisance parameters with halton points only")
        if spec.trials is not None:
            raise ConfigError("budget.trials", "an ablation's size is (variants) x (points + seeds); set those")
        return
    if spec.trials is None and spec.timeout is None:
        raise ConfigError("budget", "a search needs budget.trials or budget.timeout")
    _check_combinations(spec)


def _check_combinations(spec: StudySpec) -> None:
    """A search samples scientific values jointly: every combination must be a valid configuration."""
    keys = list(spec.scientific)
    count = math.prod(len(v) for v in spec.scientific.values())
    if count > MAX_SEARCH_COMBINATIONS:
        raise ConfigError("scientific", f"{count} combinations; at most {MAX_SEARCH_COMBINATIONS}")
    for combo in itertools.product(*spec.scientific.values()):
        values = dict(zip(keys, combo, strict=True))
        try:
            with_values(spec.base, values)
        except ConfigError as err:
            raise ConfigError(f"scientific.{err.key}", f"{err.problem} (combination {values})") from None


def resolve_key(key: Any, fields: dict[str, Any], where: str) -> str:
    """``"model.num_heads"`` as is; a bare field name (``num_heads``, ``lr``) if it names exactly one field."""
    if not isinstance(key, str):
        raise ConfigError(f"{where}.{key}", "must be a config key such as model.num_heads")
    if key in fields:
        return key
    matches = [f for f in fields if f.split(".")[-1] == key and f.split(".")[0] in RUN_SECTIONS]
    if len(matches) == 1:
        return matches[0]
    raise ConfigError(f"{where}.{key}", "unknown parameter; use a dotted config key such as model.num_heads")


def _scientific(raw: Any, base: RunConfig, fields: dict[str, Any]) -> dict[str, tuple]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("scientific", "must map at least one parameter to the list of values to compare")
    out: dict[str, tuple] = {}
    for raw_key, values in raw.items():
        key = resolve_key(raw_key, fields, "scientific")
        where = f"scientific.{raw_key}"
        if key in out:
            raise ConfigError(where, f"{key} is listed twice")
        if not isinstance(values, list) or not values:
            raise ConfigError(where, f"must be a non-empty list of values, got {values!r}")
        for value in values:
            if isinstance(value, (list, dict)):
                raise ConfigError(where, f"values must be scalars, got {value!r}")
            try:
                with_values(base, {key: value})
            except ConfigError as err:
                raise ConfigError(where, f"value {fmt(value)}: {err.key}: {err.problem}") from None
        # the base value first: it is the "base" variant, the others are one variant each
        unique = [fields[key]] + [v for v in dict.fromkeys(values) if v != fields[key]]
        out[key] = tuple(flatten(to_dict(with_values(base, {key: v})))[key] for v in unique)
    return out


def _nuisance(raw: Any, base: RunConfig, fields: dict[str, Any], scientific: dict) -> tuple[Nuisance, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ConfigError("nuisance", "must map parameters to {low, high, log}")
    out = []
    for raw_key, body in raw.items():
        key = resolve_key(raw_key, fields, "nuisance")
        where = f"nuisance.{raw_key}"
        if key in scientific:
            raise ConfigError(where, "is also scientific; a parameter is one or the other")
        if not isinstance(body, dict):
            raise ConfigError(where, f"must be a mapping {{low, high, log}}, got {body!r}")
        for part in body:
            if part not in ("low", "high", "log"):
                raise ConfigError(f"{where}.{part}", "unknown key; allowed: low, high, log")
        current = fields[key]
        if isinstance(current, bool) or not isinstance(current, (int, float)):
            raise ConfigError(where, f"must be a numeric parameter, {key} is {current!r}")
        low = _get(body, "low", float, None, f"{where}.low")
        high = _get(body, "high", float, None, f"{where}.high")
        log = _get(body, "log", bool, False, f"{where}.log")
        if low is None or high is None or not low < high:
            raise ConfigError(where, f"needs low < high, got low={low} high={high}")
        if log and low <= 0:
            raise ConfigError(f"{where}.low", f"must be > 0 on a log scale, got {low}")
        for end in (low, high):
            try:
                with_values(base, {key: int(end) if isinstance(current, int) else end})
            except ConfigError as err:
                raise ConfigError(where, f"value {end}: {err.key}: {err.problem}") from None
        out.append(Nuisance(key, low, high, log, integer=isinstance(current, int)))
    return tuple(out)


def _get(data: dict, key: str, tp: type, default: Any, where: str | None = None) -> Any:
    value = data.get(key, default)
    if value is None:
        return default
    ok = isinstance(value, tp) and not (tp is not bool and isinstance(value, bool))
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    if not ok:
        raise ConfigError(where or key, f"must be {tp.__name__}, got {value!r}")
    return value


def _positive(data: dict, key: str, default: int | None, where: str | None = None) -> int | None:
    value = _get(data, key, int, default, where)
    if value is not None and value < 1:
        raise ConfigError(where or key, f"must be >= 1, got {value}")
    return value


def _choice(data: dict, key: str, choices: tuple[str, ...], default: str) -> str:
    value = _get(data, key, str, default)
    if value not in choices:
        raise ConfigError(key, f"unknown value {value!r}; allowed: {', '.join(choices)}")
    return value
