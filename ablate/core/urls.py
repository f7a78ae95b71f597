"""Where results live unless told otherwise: one rule for the trainer, the study runner and the report; how a
store's URL is shown (``redact``: never with its password); what kind of store a URL names; and the MLflow UI's
address of an experiment's runs (``runs_url``).

Links into the MLflow UI come from ``runs_url`` only. MLflow 3 opens an experiment on its GenAI overview ("0
traces") unless the URL asks for the machine-learning workflow; the experiment tag ``mlflow.experimentKind`` does not
change that (MLflow 3.17's experiment page takes the kind from the workflow type), so the URL carries it.

Standard library only at import (SQLAlchemy is imported when a URL needs parsing), so the report can use it without
importing torch.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ablate.core import names

MASK = "***"
# query parameters that carry credentials (libpq's password and sslpassword, tokens, keys)
SECRET_QUERY = re.compile(r"(ssl)?pass(word|wd)?|pwd|secret|(access_|api_?|auth_?)?token|api_?key", re.IGNORECASE)
# "scheme://user:x...@" where x is not the mask and not a port (digits up to the path): a password left in the URL
LEFT_PASSWORD = re.compile(rf"^[^:/]+://[^:/@]*:(?!{re.escape(MASK)}@)(?!\d*(?:[/?#]|$))[^@]*@", re.S)
DATABASES = ("sqlite", "postgresql", "mysql", "mssql")  # tracking URI schemes MLflow reads as a database
URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")  # a URL inside free text (a study file, a message)
UI_HOST = "127.0.0.1"
# The runs table of the machine-learning workflow, best validation loss first: a sort other than by start time
# lists trials flat instead of folded under their (collapsed) study run.
RUNS_TABLE = {"workflowType": "machine_learning", "orderByKey": f"metrics.`{names.VAL_LOSS}`", "orderByAsc": "true"}


def runs_url(experiment_id: str, run_id: str | None = None, port: int = 5000, order_by: str = names.VAL_LOSS) -> str:
    """The MLflow UI's runs table of ``experiment_id``, best ``order_by`` first (or the page of ``run_id`` in it),
    served by ``ablate ui``."""
    if run_id is None:
        table = {**RUNS_TABLE, "orderByKey": f"metrics.`{order_by}`"}
        return f"http://{UI_HOST}:{port}/#/experiments/{experiment_id}/runs?{urlencode(table)}"
    workflow = urlencode({"workflowType": RUNS_TABLE["workflowType"]})
    return f"http://{UI_HOST}:{port}/#/experiments/{experiment_id}/runs/{run_id}?{workflow}"


def is_database(uri: str) -> bool:
    """Whether MLflow reads ``uri`` as a database (SQLite, PostgreSQL, MySQL, SQL Server), not a server or folder."""
    return uri.split("://", 1)[0].split("+", 1)[0] in DATABASES


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else the SQLite store ``runs/mlflow.db`` under the current directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'runs' / 'mlflow.db'}"


def default_storage() -> str:
    """``$ABLATE_STORAGE``, else the Optuna SQLite store ``runs/optuna.db`` under the current directory."""
    return os.environ.get("ABLATE_STORAGE") or f"sqlite:///{Path.cwd().resolve() / 'runs' / 'optuna.db'}"


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL (MLflow's or Optuna's), None for any other store."""
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def redact(url: str) -> str:
    """``url`` as it may be shown or stored: its password (and query parameters such as ``password=``) as ``***``.

    Database URLs are read the way SQLAlchemy (Optuna's and MLflow's stores) reads them, so a password holding
    ``/`` or ``@`` is masked whole; http(s) URLs the way urllib reads them. Anything else comes back unchanged.
    """
    if not isinstance(url, str) or "://" not in url:
        return url
    scheme = url.split("://", 1)[0].lower()
    shown = _redact_http(url) if scheme in ("http", "https") else _redact_db(url)
    if LEFT_PASSWORD.match(shown):  # a password neither parser saw whole (an unescaped "/" in it): mask generously
        shown = _mask_to_last_at(shown)
    return _redact_query(shown)


def redact_text(text: str) -> str:
    """Every URL in ``text`` redacted (a study file as written, a message)."""
    return URL.sub(lambda m: redact(m.group(0)), text) if isinstance(text, str) and "://" in text else text


def is_redacted(url: str | None) -> bool:
    """Whether ``url`` is a stored copy whose password was masked (it cannot be used to connect)."""
    return bool(url) and redact(url) == url and f":{MASK}@" in url


def _redact_http(url: str) -> str:
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # an unescaped "[" or "]" reads as a broken IPv6 host
        return _mask_to_last_at(url)
    if password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{MASK}@{host}"))


def _redact_db(url: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # not a URL SQLAlchemy reads
        return _mask_to_last_at(url)
    if parsed.password is None:
        return url
    if "@" in (parsed.host or ""):  # an unescaped "@" in the password: SQLAlchemy took part of it for the host
        return _mask_to_last_at(url)
    return parsed.render_as_string(hide_password=True)


def _mask_to_last_at(url: str) -> str:
    """Everything between ``scheme://user:`` and the last ``@`` masked: maybe more than the password, never less."""
    return re.sub(r"^([^:/]+://[^:/@]*):.*@", rf"\1:{MASK}@", url, flags=re.S)


def _redact_query(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if not parts.query:
        return url
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if not any(SECRET_QUERY.fullmatch(key) for key, _ in pairs):
        return url
    query = urlencode([(key, MASK if SECRET_QUERY.fullmatch(key) else value) for key, value in pairs], safe="*")
    return urlunsplit(parts._replace(query=query))
