"""``ablate report``: one self-contained HTML page per study (``study_page``: plus results.csv and summary.md),
one per family of studies (``family``), and the index of every study (``index``).

Reads the Optuna storage and the MLflow store, never torch: the report runs anywhere the stores can be read.
"""

from __future__ import annotations

import sys

from ablate.core.config import ConfigError
from ablate.design.families import load_specs
from ablate.design.study_file import check_name
from ablate.report.family import build_family_report, families
from ablate.report.index import build_index, safe_name
from ablate.report.load import load_study, safe_study_names
from ablate.report.study_page import build_report

__all__ = ["build_index", "build_report", "report_command", "load_study"]


def report_command(studies: list[str], *, all_studies: bool = False, storage: str | None = None,
                   out: str = "reports") -> int:
    """Write ``<out>/<study>/index.html`` for each study name or study file (for a family: each member's, then the
    family's page), then ``<out>/index.html`` listing every study of their stores; 0 on success, 2 if a study was
    skipped or none found."""
    targets: list[tuple[str, str | None, str | None]] = []
    family_targets: list[tuple[str, str | None, str | None]] = []
    for item in studies:
        if item.endswith((".yaml", ".yml")):
            specs = load_specs(item, preflight=False)  # a finished study's report does not need its data any more
            targets += [(s.name, storage or s.storage, s.tracking_uri) for s in specs]
            if specs[0].family:
                family_targets.append((specs[0].family, storage or specs[0].storage, specs[0].tracking_uri))
            continue
        name = check_name(item)  # before any store is opened: a bad name is the one problem reported
        members = families(storage).get(name, [])
        targets += [(name, storage, None) for name in members] or [(item, storage, None)]
        family_targets += [(item, storage, None)] if members else []
    skipped: list[str] = []
    if all_studies:
        listed, skipped = safe_study_names(storage)  # a shared store can hold any name: a bad one is never written
        targets += [(name, storage, None) for name in listed]
        family_targets += [(name, storage, None) for name in families(storage) if safe_name(name)]
        for line in skipped:
            print(f"ablate report: skipped: {line}", file=sys.stderr)
    if not targets and not skipped:
        raise ConfigError("report", "name a study (or a studies/*.yaml file), or pass --all")
    for name, store, uri in dict.fromkeys(targets):
        path = build_report(name, storage=store, tracking_uri=uri, out=out, index=False)
        print(f"ablate report: {name}: {path}")
    for name, store, uri in dict.fromkeys(family_targets):
        path = build_family_report(name, storage=store, tracking_uri=uri, out=out)
        print(f"ablate report: {name}: {path}")
    if targets:  # a store holding only unsafe names gets nothing written
        print(f"ablate report: every study: {build_index([store for _, store, _ in targets], out)}")
    return 2 if skipped else 0
