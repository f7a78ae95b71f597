"""Rendering: the jinja2 page (autoescaped, so run data cannot inject markup) and the Markdown summary."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

TEMPLATE = "template.html.j2"


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent),
        autoescape=True,  # every value from run data (tags, params, reasons, the study file) is escaped
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = num
    return env


def num(value: Any, digits: int = 4) -> str:
    """A number for a table cell: 4 significant digits, thousands grouped for large values, blank for NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if abs(value) >= 1e9:
        return f"{value:.3g}"
    if abs(value) >= 1e3 and float(value).is_integer() or abs(value) >= 1e4:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def render(context: dict) -> str:
    return _env().get_template(TEMPLATE).render(**context)


def table(df: pd.DataFrame) -> dict:
    """A DataFrame as {"columns": [...], "rows": [[...]]} of display strings for the template."""
    text = [not pd.api.types.is_numeric_dtype(df[c]) for c in df.columns]  # text columns align left
    return {"columns": [str(c) for c in df.columns], "text": text,
            "rows": [[num(v) for v in row] for row in df.itertuples(False)]}


def markdown(title: str, answers: list[dict], rows: pd.DataFrame, notes: list[str]) -> str:
    """summary.md: the answer and the variant table, for a README or a pull request."""
    lines = [f"# {title}", ""]
    lines += [f"- **{a['factor']}** → **{a['choice']}** ({a['verdict']}): {a['text']}" for a in answers]
    if notes:
        lines += ["", *[f"> {n}" for n in notes]]
    if not rows.empty:
        cols = [str(c) for c in rows.columns]
        lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(num(v).replace("|", "\\|") for v in r) + " |" for r in rows.itertuples(False)]
    return "\n".join(lines) + "\n"
