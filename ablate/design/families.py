"""Families of studies: one study file that runs several, one per rung of a size ladder (``ladder:``) and/or per
budget (``budget.match: [steps, flops]``). Each member is a plain study of its own, named ``<name>.<label>``, with the
base changed by its rung and the budget set to its own; ``ablate.report.family`` compares their answers.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path
from typing import Any

from ablate.core.config import RUN_SECTIONS, ConfigError, flatten, set_path, to_dict, with_sections_copied
from ablate.core.inputs import read_text, read_yaml
from ablate.core.sizes import MATCHES
from ablate.design.preflight import check_study
from ablate.design.spec import StudySpec, redacted, spec_from_mapping
from ablate.design.study_file import TOKENIZER_KEYS, check_name, check_tokenizer_outcome


def load_specs(path: str | Path, overrides: list[str] = (), *, preflight: bool = True) -> list[StudySpec]:
    """Every study the file at ``path`` runs: one, or one per member of its family (:func:`expand`), in order.
    All members are validated (and preflighted) before any of them runs."""
    source = str(path)
    text = read_text(path)
    data = read_yaml(path, text)
    try:
        specs = family_specs(data, overrides, source=source, text=text)
        if preflight:
            for spec in specs:
                check_study(spec)
        return specs
    except ConfigError as err:
        raise err.at(source) from None


def load_spec(path: str | Path, overrides: list[str] = (), *, preflight: bool = True) -> StudySpec:
    """The study file at ``path``, validated; every problem is a one-line ConfigError naming the file and key.

    With ``preflight`` (a study about to run), also what can be checked on this machine before any store exists:
    every variant's data source and memory (``ablate.design.preflight``). The report reads a finished study without it.
    A file with a ladder or several budgets is a family of studies: :func:`load_specs`.
    """
    specs = load_specs(path, overrides, preflight=preflight)
    if len(specs) > 1:
        raise ConfigError("ladder", f"this file runs {len(specs)} studies ({', '.join(s.name for s in specs)}); "
                                    "name one of them", str(path))  # fmt: skip
    return specs[0]


def family_specs(data: dict, overrides: list[str] = (), *, source: str = "", text: str = "") -> list[StudySpec]:
    """The specs of a study file's mapping: one for a plain study, else one per member, each a plain study of its
    own (``spec_from_mapping`` reads a member's stored mapping back), marked with its family and label."""
    members = expand(data)
    labels = {part for label, _ in members for part in label.split(".") if part}
    for key, claim in (data.get("claims") or {}).items():
        member = claim.get("member") if isinstance(claim, dict) else None
        if member and member not in labels:
            raise ConfigError(f"claims.{key}.member", f"{member!r} is not a member of this study; its members: "
                                                      f"{', '.join(sorted(labels)) or 'none (no ladder or budgets)'}")
    if len(members) == 1 and not members[0][0]:
        return [spec_from_mapping(data, overrides, source=source, text=text)]
    family_data = redacted(data)
    out = []
    for label, mapping in members:
        try:
            spec = spec_from_mapping(mapping, overrides, source=source, text=text)
        except ConfigError as err:
            raise ConfigError(err.key, f"{err.problem} (in member {label})") from None
        out.append(dataclasses.replace(spec, family=data["name"], member=label, family_data=family_data))
    changed = [k for k in TOKENIZER_KEYS if len({flatten(to_dict(s.base))[k] for s in out}) > 1]
    check_tokenizer_outcome(changed, out[0].outcome)  # the family page compares its members' losses too
    return out


def expand(data: dict) -> list[tuple[str, dict]]:
    """A study file's members as (label, mapping of a plain study): ``[("", data)]`` without a ladder or a list of
    budgets; else one per rung of ``ladder`` times each ``budget.match``, named ``<name>.<rung>[.<match>]``."""
    ladder = data.get("ladder") or {}
    budget = data.get("budget") or {}
    matches = budget.get("match") if isinstance(budget, dict) else None
    if not ladder and not isinstance(matches, list):
        return [("", data)]
    if not isinstance(ladder, dict):
        raise ConfigError("ladder", "must map a label to the base's changes, e.g. w128: {model.embed_dim: 128}")
    rungs = [(_rung_label(label), _rung(label, changes)) for label, changes in ladder.items()] or [("", {})]
    if isinstance(matches, list) and budget.get("value") is not None:
        raise ConfigError("budget.value", "is in the unit of one budget; with a list of budgets, leave it out")
    budgets = _budget_list(matches) if isinstance(matches, list) else [""]
    out = []
    for (rung, changes), match in itertools.product(rungs, budgets):
        label = ".".join(part for part in (rung, match) if part)
        mapping = with_sections_copied({k: v for k, v in data.items() if k != "ladder"})
        for key, value in changes.items():
            set_path(mapping, key, value)
        if match:
            mapping["budget"] = {**budget, "match": match}
        mapping["name"] = f"{check_name(data.get('name'))}.{label}"
        out.append((label, mapping))
    return out


def _rung_label(label: object) -> str:
    if not isinstance(label, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", label):
        raise ConfigError(f"ladder.{label}", "a rung's label must be 1-40 letters, digits, '_' or '-'")
    return label


def _rung(label: str, changes: object) -> dict[str, Any]:
    if not isinstance(changes, dict) or not changes:
        raise ConfigError(f"ladder.{label}", "must map config keys to values, e.g. {model.embed_dim: 128}")
    for key in changes:
        if not isinstance(key, str) or key.split(".")[0] not in RUN_SECTIONS or "." not in key:
            raise ConfigError(f"ladder.{label}.{key}", f"must be a dotted key of {', '.join(RUN_SECTIONS)}")
    return changes


def _budget_list(matches: list) -> list[str]:
    if len(matches) < 2 or len(set(map(str, matches))) != len(matches):
        raise ConfigError("budget.match", f"a list needs at least two different budgets, got {matches!r}")
    for match in matches:
        if match not in MATCHES:
            raise ConfigError("budget.match", f"unknown value {match!r}; allowed: {', '.join(MATCHES)}")
    return list(matches)
