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
import re
from dataclasses import dataclass, field
from typing import Any

from scipy.stats import qmc

from ablate.budget import MATCHES, ComputeBudget, from_study
from ablate.config import (
    RUN_SECTIONS,
    ConfigError,
    ModelConfig,
    RunConfig,
    TaskConfig,
    TrainConfig,
    choice,
    flatten,
    fmt,
    from_dict,
    to_dict,
    with_overrides,
    with_values,
)
from ablate.stores import redact_text

KINDS = ("ablation", "search")
SAMPLERS = ("tpe", "random", "halton")
PRUNERS = ("none", "median", "hyperband")
HALTON_SEED = 0  # the same nuisance points for every variant, and for every run of the same study file
MAX_SEARCH_COMBINATIONS = 100_000
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # also a folder name under reports/: no "..", no "/"
MAX_NAME = 100  # characters of a study name: it is a folder, a lock file's name and an MLflow experiment
MAX_POINTS = 1000  # tune points, extra points and seeds per variant: a plan of millions of trials is a typo
MAX_VARIANTS = 1000
MAX_WORKERS = 256  # worker processes on one machine
MAX_TOGETHER = 64  # trials one worker trains as one stacked model (``ablate.together``)


def check_name(name: object, key: str = "name") -> str:
    """``name`` if it is a safe study name (a single path component: a folder under reports/, a lock file's name),
    else a ConfigError naming ``key``. Names read back from a store are checked too: a store can be shared."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or len(name) > MAX_NAME:
        shown = repr(name) if len(repr(name)) <= 60 else repr(name)[:57] + "..."
        raise ConfigError(key, f"must be a name of at most {MAX_NAME} letters, digits, '_', '.', '-' (not starting "
                               f"with '.' or '-'), got {shown}")  # fmt: skip
    return name


def check_workers(workers: object, key: str) -> int | str:
    """``workers`` if it is ``auto`` or a number of processes in [1, MAX_WORKERS], else a ConfigError naming ``key``."""
    if workers == "auto" or isinstance(workers, int) and not isinstance(workers, bool) and 1 <= workers <= MAX_WORKERS:
        return workers
    raise ConfigError(key, f"must be auto or a number in [1, {MAX_WORKERS}], got {workers!r}")


def check_together(together: object, key: str) -> int | str:
    """``together`` if it is ``auto`` or a number of trials in [1, MAX_TOGETHER], else a ConfigError naming ``key``."""
    number = isinstance(together, int) and not isinstance(together, bool)
    if together == "auto" or number and 1 <= together <= MAX_TOGETHER:
        return together
    raise ConfigError(key, f"must be auto or a number in [1, {MAX_TOGETHER}], got {together!r}")


@dataclass(frozen=True)
class Range:
    """A nuisance parameter's range. An ablation never tries a value outside ``[low, high]``: they are hard limits."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    """Search on a log scale (learning rates); needs ``low > 0``."""

    def __post_init__(self) -> None:
        if self.low is None or self.high is None or not self.low < self.high:
            raise ConfigError("", f"needs low < high, got low={self.low} high={self.high}")
        if self.log and self.low <= 0:
            raise ConfigError("low", f"must be > 0 on a log scale, got {self.low}")


@dataclass(frozen=True)
class Seeds:
    """Seeds per arm: ``min`` for every arm; arms still undecided then get up to ``max`` (see ``ablate.verdicts``)."""

    min: int = 3
    max: int = 3

    def __post_init__(self) -> None:
        if self.min < 1:
            raise ConfigError("min", f"must be >= 1, got {self.min}")
        if self.max < self.min:
            raise ConfigError("max", f"must be >= min ({self.min}), got {self.max}")
        if self.max > MAX_POINTS:
            raise ConfigError("max", f"must be <= {MAX_POINTS}, got {self.max}")


@dataclass(frozen=True)
class Budget:
    trials: int | None = None
    """search: total trials in the study. An ablation's size follows from its plan."""
    timeout: float | None = None
    """Seconds after which workers take no new trial (resume later with the same command)."""
    match: str = choice("steps", MATCHES, "what every arm uses as much of as the base (ablate.budget): steps, "
                                          "tokens, flops or wall (seconds of training); a list (``[steps, flops]``) "
                                          "runs the ablation once per budget, side by side")  # fmt: skip
    value: float | None = None
    """Each arm's budget in the unit of ``match`` (tokens, FLOPs, seconds); default: what the base's train.steps use.
    A wall budget needs it."""

    def __post_init__(self) -> None:
        if self.trials is not None and self.trials < 1:
            raise ConfigError("trials", f"must be >= 1, got {self.trials}")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError("timeout", f"must be > 0 seconds, got {self.timeout}")
        if self.value is not None and not self.value > 0:
            raise ConfigError("value", f"must be > 0 ({self.match}), got {self.value}")


EXPECTED = ("better", "worse", "equivalent", "not worse", "not better")


@dataclass(frozen=True)
class Claim:
    """A published claim this study puts to the test (``ablate.report.claims`` judges it from the data)."""

    source: str = ""
    """Who claimed it, where: "Vaswani et al. 2017, Table 3 rows (A)"."""
    claim: str = ""
    """The claim in one sentence."""
    published: str = ""
    """The published numbers it rests on."""
    caveat: str = ""
    """What differs here from the published setting, beyond the scale and task the report states itself."""
    expect: dict[str, str] = field(default_factory=dict)
    """Variant -> its expected verdict against the base: better, worse, equivalent, not worse, not better."""
    less_sensitive: str = ""
    """A variant whose learning-rate sensitivity (over the tune points) should be lower than ``than``'s."""
    than: str = "base"
    lr_exponent: dict[str, list[float]] = field(default_factory=dict)
    """Family with a width ladder: variant -> [low, high] expected for b in best lr ∝ width^b."""
    solves: tuple[str, ...] = ()
    """Variants ("base" too) whose test accuracy should reach ``names.SOLVED_ACC`` (a generated task: solved)."""

    @property
    def in_one_study(self) -> bool:
        """Whether one study's numbers judge a part of it (all but ``lr_exponent``, which needs a width ladder)."""
        return bool(self.expect or self.less_sensitive or self.solves)
    member: str = ""
    """In a family: the one member (its label, "dk_fixed") whose numbers test the claim; "": every member."""

    def __post_init__(self) -> None:
        if not self.source or not self.claim:
            raise ConfigError("", "needs source and claim (who said it, in one sentence)")
        if not (self.expect or self.less_sensitive or self.lr_exponent or self.solves):
            raise ConfigError("", "needs an expectation: expect, less_sensitive, lr_exponent or solves")
        for variant, verdict in self.expect.items():
            if verdict not in EXPECTED:
                raise ConfigError(f"expect.{variant}", f"unknown verdict {verdict!r}; allowed: {', '.join(EXPECTED)}")
        for variant, bounds in self.lr_exponent.items():
            if len(bounds) != 2 or not all(isinstance(b, (int, float)) for b in bounds) or not bounds[0] < bounds[1]:
                raise ConfigError(f"lr_exponent.{variant}", f"must be [low, high] with low < high, got {bounds!r}")


@dataclass(frozen=True)
class StudyFile:
    """A study file as written: every top-level key, typed. Unknown keys, wrong types and choices fail here."""

    name: str = ""
    kind: str = choice("ablation", KINDS, "ablation: one factor at a time around the base; search: joint search")
    description: str = ""
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scientific: dict[str, list] = field(default_factory=dict)
    """Config key (dotted, or a bare field name naming one field) -> the values to compare; the base value first."""
    nuisance: dict[str, Range] = field(default_factory=dict)
    """Config key -> its range, re-tuned for every scientific value."""
    points: int = 3
    """Ablation: first tune points per variant; more follow until the best is bracketed (see ``ablate.plan``)."""
    seeds: int | Seeds = 3
    """Seed re-runs per variant: a number, or ``{min, max}`` for sequential seeds. Fewer than 2 decide nothing."""
    tune_seeds: int = 2
    """Ablation: tune seeds each tune point runs on (never verdict seeds). Two or more let each arm's learning rate be
    chosen from seed means, and bound what the choice costs it (``ablate.tuning``); one run per point cannot."""
    margin: float = 0.03
    """The smallest difference of the verdict metric (test loss, nats per token) that matters; differences within
    +-margin count as "equivalent". 0.03 nats is about 2% of a small char-level model's loss (1.7 nats/char): less
    than that rarely decides an architecture. Set it in the metric's units for other tasks."""
    alpha: float = 0.05
    """Per factor, the chance of any false better/worse/equivalent claim is at most this."""
    max_extra_points: int = 3
    """Ablation: at most this many tune points per variant beyond ``points`` while bracketing its optimum."""
    budget: Budget = field(default_factory=Budget)
    sampler: str | None = choice(None, SAMPLERS, "search only: tpe (default), random or halton")
    pruner: str | None = choice(None, PRUNERS, "search only: median (default), hyperband or none")
    storage: str | None = None
    tracking_uri: str | None = None
    heartbeat: int = 10
    """Seconds between a running trial's heartbeats; a trial silent for 3x this long is failed and retried."""
    workers: int | str = 1
    """Worker processes on this machine when ``--workers`` is not given, or ``auto``: one per core on a CPU, on a GPU
    machine as many per device as fit its memory (``ablate.devices``); torch threads are split between them."""
    together: int | str = "auto"
    """Trials of one architecture (a variant's tune points, its seeds) a worker trains as one stacked model, each
    still its own trial and run (``ablate.together``): ``auto`` is up to 8 on a CUDA device, as many as fit its
    memory, and 1 (one run at a time) on a CPU, where it does not pay; a number forces it (1: never)."""
    claims: dict[str, Claim] = field(default_factory=dict)
    """Id -> a published claim this study tests; its verdict (reproduced, not reproduced, inconclusive) is computed
    from the study's own verdicts (``ablate.report.claims``)."""
    ladder: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Label -> changes to the base (``{model.embed_dim: 128, model.num_layers: 3}``): the whole study is run once
    per rung, each its own Optuna study ``<name>.<label>`` (see :func:`expand`); the report compares their answers."""

    def __post_init__(self) -> None:
        check_name(self.name)
        check_workers(self.workers, "workers")
        check_together(self.together, "together")
        for key, most in (("points", MAX_POINTS), ("tune_seeds", MAX_POINTS), ("heartbeat", 3600)):
            if not 1 <= getattr(self, key) <= most:
                raise ConfigError(key, f"must be in [1, {most}], got {getattr(self, key)}")
        if not 0 <= self.max_extra_points <= MAX_POINTS:
            raise ConfigError("max_extra_points", f"must be in [0, {MAX_POINTS}], got {self.max_extra_points}")
        if isinstance(self.seeds, int) and not 1 <= self.seeds <= MAX_POINTS:
            raise ConfigError("seeds", f"must be in [1, {MAX_POINTS}], got {self.seeds}")
        if not self.margin > 0:
            raise ConfigError("margin", f"must be > 0, got {self.margin}")
        if not 0 < self.alpha < 0.5:
            raise ConfigError("alpha", f"must be in (0, 0.5), got {self.alpha}")


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
    margin: float = 0.03
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
