"""Rendering: the jinja2 page (autoescaped, so run data cannot inject markup) and the Markdown summary."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from ablate.core.urls import redact_text

TEMPLATE = "template.html.j2"  # a study's report; it and the index share page.css.j2 and sortable.js.j2
INDEX_TEMPLATE = "index.html.j2"  # every study of a store on one page


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent),
        autoescape=True,  # every value from run data (tags, params, reasons, the study file) is escaped
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = num
    env.filters["duration"] = duration
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


def duration(seconds: float | None) -> str:
    """Wall time as people say it: 45 s, 29 min 27 s, 3 h 05 min; blank when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return ""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


SUMMARY = "summary.md"  # beside every page (a study's, a family's): its first line is "# <name>: <answer>"


def summary_line(folder: Path) -> str:
    """The first line of ``folder``'s summary.md without its "# ", that is "<name>: <answer>"; "" without one."""
    path = folder / SUMMARY
    if not path.is_file():
        return ""
    with path.open(encoding="utf-8", errors="replace") as f:
        return f.readline(2000).strip().removeprefix("# ")


def write_page(path: Path, text: str) -> None:
    """Write ``text`` (passwords in URLs masked) whole, then rename it over ``path``: a reader never sees half a page,
    and a link planted at ``path`` (or at the temporary name) is replaced rather than followed. Every file a report
    writes goes through here: pages, ``results.csv``, ``summary.md``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with open(fd, "w", encoding="utf-8") as f:
        f.write(redact_text(text))
    os.replace(tmp, path)


def render(context: dict, template: str = TEMPLATE) -> str:
    return _env().get_template(template).render(**context)


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
