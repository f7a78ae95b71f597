"""The study file (``studies/*.yaml``): its typed shape (:class:`StudyFile`, parsed by ``config.from_dict`` like every
other config) and the resolved, validated :class:`StudySpec` the runner and the report share.

A study names the parameters it asks about (``scientific``: values to compare), the ones re-tuned for every
scientific value (``nuisance``: ranges searched per value) and fixes the rest (the base ``model``/``task``/``train``),
in the terms of Google's Deep Learning Tuning Playbook. Standard library, yaml and scipy only: the report uses it.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from scipy.stats import qmc

from ablate.core.config import (
    RUN_SECTIONS,
    ConfigError,
    RunConfig,
    flatten,
    fmt,
    from_dict,
    to_dict,
    with_overrides,
    with_values,
)
from ablate.core.sizes import ComputeBudget, from_study
from ablate.core.urls import redact_text
from ablate.design.study_file import (
    HALTON_SEED,
    MAX_SEARCH_COMBINATIONS,
    MAX_VARIANTS,
    Claim,
    Range,
    Seeds,
    StudyFile,
    check_tokenizer_outcome,
)


@dataclass(frozen=True)
class Nuisance:
    """A parameter re-tuned for every scientific value, within ``[low, high]`` (log-uniform when ``log``)."""

    key: str
    low: float
    high: float
    log: bool = False
    integer: bool = False

    def value_at(self, u: float) -> float | int:
        """The point at quantile ``u`` in [0, 1]."""
        if self.log:
            value = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        else:
            value = self.low + u * (self.high - self.low)
        value = min(self.high, max(self.low, value))
        return int(min(self.high, math.floor(value + 0.5))) if self.integer else float(value)

    def quantile(self, value: float) -> float:
        """Where ``value`` sits in ``[low, high]``, 0 to 1 (on the log scale when ``log``)."""
        if self.log:
            return (math.log(value) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return (value - self.low) / (self.high - self.low)


@dataclass(frozen=True)
class Variant:
    """``base``, or the base with one scientific parameter changed (``model.num_heads=8``)."""

    name: str
    factor: str  # the changed key, "" for base
    values: dict[str, Any]  # every scientific key -> its value in this variant


@dataclass(frozen=True)
class StudySpec:
    """A validated study: the base config, resolved keys, the values to compare, the rules of the plan."""

    name: str
    kind: str
    base: RunConfig
    scientific: dict[str, tuple]  # dotted key -> values to compare, base value first
    nuisance: tuple[Nuisance, ...]
    points: int = 3
    tune_seeds: int = 2
    min_seeds: int = 3
    max_seeds: int = 3
    outcome: str = "loss"  # the metric tuning and verdicts are on: loss (nats per token) or bpb (bits per byte)
    margin: float = 0.03  # in the outcome's units
    alpha: float = 0.05
    max_extra_points: int = 3
    trials: int | None = None
    timeout: float | None = None
    compute: ComputeBudget | None = None  # each arm's budget (``budget.match``); None: every arm trains train.steps
    sampler: str = "tpe"
    pruner: str = "none"
    storage: str | None = None
    tracking_uri: str | None = None
    heartbeat: int = 10
    workers: int | str = 1
    together: int | str = "auto"
    description: str = ""
    source: str = ""
    text: str = ""  # the study file as written, passwords in URLs masked (logged as an artifact)
    data: dict = field(default_factory=dict)  # the mapping as loaded, passwords masked (the study's user attrs)
    digest: str = hashlib.sha256(b"").hexdigest()  # sha256 of the study file as written (before masking)
    claims: dict[str, Claim] = field(default_factory=dict)  # id -> a published claim the study tests
    family: str = ""  # the study file's name when it runs several members (a ladder, several budgets), else ""
    member: str = ""  # this member's label in its family ("w128", "flops", "w128.flops"), else ""
    family_data: dict = field(default_factory=dict)  # the family's study file as loaded, passwords masked

    def base_value(self, key: str) -> Any:
        return flatten(to_dict(self.base))[key]

    def variants(self) -> list[Variant]:
        base_values = {key: values[0] for key, values in self.scientific.items()}
        out = [Variant("base", "", base_values)]
        for key, values in self.scientific.items():
            out += [Variant(f"{key}={fmt(v)}", key, {**base_values, key: v}) for v in values[1:]]
        return out

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants() if v.name == name)

    def tests(self, claim: Claim) -> bool:
        """Whether this study's numbers test ``claim`` (in a family, a claim can name the one member it is about)."""
        return not claim.member or claim.member in self.member.split(".")

    def first_points(self) -> list[dict[str, Any]]:
        """The first tune points of every variant (quantiles, 0 to 1, per nuisance key).

        One nuisance parameter: an even grid at the centres of ``points`` equal cells (for 3: 1/6, 1/2, 5/6), so the
        spacing is one cell and the first bracketing step extends by exactly one cell. Several: scrambled Halton.
        """
        if not self.nuisance:
            return []
        if len(self.nuisance) == 1:
            return [{self.nuisance[0].key: (i + 0.5) / self.points} for i in range(self.points)]
        sample = qmc.Halton(d=len(self.nuisance), scramble=True, seed=HALTON_SEED).random(self.points)
        return [{p.key: float(u) for p, u in zip(self.nuisance, row, strict=True)} for row in sample]

    def at(self, quantiles: dict[str, float]) -> dict[str, Any]:
        """Nuisance values at the given quantiles."""
        return {p.key: p.value_at(quantiles[p.key]) for p in self.nuisance}


# ---------------------------------------------------------------------------------------------------------------
# Loading and validating


def spec_from_mapping(data: dict, overrides: list[str] = (), *, source: str = "", text: str = "") -> StudySpec:
    """The spec of a study file's mapping: the runner's (from the file) and the report's (from the stored copy)."""
    data = with_overrides(data, overrides)
    raw: StudyFile = from_dict(StudyFile, data)
    if raw.ladder:
        raise ConfigError("ladder", "a ladder runs one study per rung: load the file with load_specs")
    base = RunConfig(model=raw.model, task=raw.task, train=raw.train)
    fields = flatten(to_dict(base))
    scientific = _scientific(raw.scientific, base, fields)
    seeds = raw.seeds if isinstance(raw.seeds, Seeds) else Seeds(raw.seeds, raw.seeds)
    nuisance = _nuisance(raw.nuisance, base, fields, scientific)
    check_tokenizer_outcome([*scientific, *(p.key for p in nuisance)], raw.outcome)
    compute = from_study(raw.budget.match, raw.budget.value, base, scientific, [p.key for p in nuisance])
    spec = StudySpec(
        name=raw.name,
        kind=raw.kind,
        base=base,
        scientific=scientific,
        nuisance=nuisance,
        points=raw.points,
        tune_seeds=raw.tune_seeds,
        min_seeds=seeds.min,
        max_seeds=seeds.max,
        outcome=raw.outcome,
        margin=raw.margin,
        alpha=raw.alpha,
        max_extra_points=raw.max_extra_points,
        trials=raw.budget.trials,
        timeout=raw.budget.timeout,
        compute=compute,
        sampler=raw.sampler or ("tpe" if raw.kind == "search" else "halton"),
        pruner=raw.pruner or ("median" if raw.kind == "search" and compute is None else "none"),
        storage=raw.storage,
        tracking_uri=raw.tracking_uri,
        heartbeat=raw.heartbeat,
        workers=raw.workers,
        together=raw.together,
        description=redact_text(raw.description),
        source=source,
        text=redact_text(text),
        data=redacted(data),
        digest=hashlib.sha256(text.encode()).hexdigest(),
        claims=raw.claims,
    )
    _check_kind(spec)
    _check_claims(spec)
    if len(spec.variants()) > MAX_VARIANTS:
        raise ConfigError("scientific", f"{len(spec.variants())} variants; at most {MAX_VARIANTS}")
    return spec


def redacted(value: Any) -> Any:
    """A copy of the mapping with every URL's password masked: what is stored of a study file."""
    if isinstance(value, dict):
        return {k: redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v) for v in value]
    return redact_text(value) if isinstance(value, str) else value


def _check_kind(spec: StudySpec) -> None:
    if spec.kind == "ablation":
        if spec.pruner != "none":
            raise ConfigError("pruner", "an ablation never prunes (every value gets the same budget); use none")
        if spec.sampler != "halton":
            raise ConfigError("sampler", "an ablation explores nuisance parameters with its own plan; leave it out")
        if spec.trials is not None:
            raise ConfigError("budget.trials", "an ablation's size follows from its variants, points and seeds")
        return
    if spec.trials is None and spec.timeout is None:
        raise ConfigError("budget", "a search needs budget.trials or budget.timeout")
    if spec.compute is not None and spec.pruner != "none":
        raise ConfigError("pruner", f"a pruner compares runs at equal steps, and budget.match {spec.compute.match} "
                                    "gives each arm its own; use none")  # fmt: skip
    _check_combinations(spec)


def _check_claims(spec: StudySpec) -> None:
    """Every variant a claim names is one this study runs."""
    names = {v.name for v in spec.variants()}
    for key, claim in spec.claims.items():
        named = [("expect", v) for v in claim.expect] + [("lr_exponent", v) for v in claim.lr_exponent]
        named += [("solves", v) for v in claim.solves]
        named += [(f, v) for f, v in (("less_sensitive", claim.less_sensitive), ("than", claim.than)) if v]
        for where, variant in named:
            if variant not in names:
                raise ConfigError(f"claims.{key}.{where}", f"{variant!r} is not a variant of this study; its variants: "
                                                           f"{', '.join(sorted(names))}")  # fmt: skip
        if claim.less_sensitive and not spec.nuisance:
            raise ConfigError(f"claims.{key}.less_sensitive", "needs a tuned nuisance parameter (the learning rate)")


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
    if key in fields:
        return key
    matches = [f for f in fields if f.split(".")[-1] == key and f.split(".")[0] in RUN_SECTIONS]
    if len(matches) == 1:
        return matches[0]
    raise ConfigError(f"{where}.{key}", "unknown parameter; use a dotted config key such as model.num_heads")


def _scientific(raw: dict[str, list], base: RunConfig, fields: dict[str, Any]) -> dict[str, tuple]:
    if not raw:
        raise ConfigError("scientific", "must map at least one parameter to the list of values to compare")
    out: dict[str, tuple] = {}
    for raw_key, values in raw.items():
        key = resolve_key(raw_key, fields, "scientific")
        where = f"scientific.{raw_key}"
        if key in out:
            raise ConfigError(where, f"{key} is listed twice")
        if not values:
            raise ConfigError(where, "must be a non-empty list of values")
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


def _nuisance(raw: dict[str, Range], base: RunConfig, fields: dict[str, Any], scientific: dict) -> tuple:
    out = []
    for raw_key, body in raw.items():
        key = resolve_key(raw_key, fields, "nuisance")
        where = f"nuisance.{raw_key}"
        if key in scientific:
            raise ConfigError(where, "is also scientific; a parameter is one or the other")
        current = fields[key]
        if isinstance(current, bool) or not isinstance(current, (int, float)):
            raise ConfigError(where, f"must be a numeric parameter, {key} is {current!r}")
        for end in (body.low, body.high):
            try:
                with_values(base, {key: int(end) if isinstance(current, int) else end})
            except ConfigError as err:
                raise ConfigError(where, f"value {end}: {err.key}: {err.problem}") from None
        out.append(Nuisance(key, body.low, body.high, body.log, integer=isinstance(current, int)))
    return tuple(out)
