"""Where a text task's ``task.source`` points, and whether it can be read, checked before anything is built (no
torch): ``python-docs``; a UTF-8 ``.txt`` file, or a folder holding some (not binary, not empty); Parquet, JSON Lines
or CSV files (a path or a glob) with the text column; or ``hf:<name>[:<config>]``, resolved by ``datasets`` without
downloading the data (offline: only from the cache)."""

from __future__ import annotations

import codecs
import glob
import os
from pathlib import Path

from ablate.core.config import ConfigError

CHUNK = 1 << 20  # files are checked in pieces: a large corpus is never held twice

DATA_FILES = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}  # suffix -> datasets builder


def data_files(source: str) -> list[Path]:
    """The Parquet, JSON Lines or CSV files a local ``source`` names (a file or a glob, one format), else []."""
    path = Path(source).expanduser()
    if any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
    else:
        files = [path] if path.is_file() else []
    files = [f for f in files if f.suffix.lower() in DATA_FILES]
    if len({DATA_FILES[f.suffix.lower()] for f in files}) > 1:
        raise ConfigError("task.source", f"{source!r} mixes formats ({', '.join(sorted({f.suffix for f in files}))}); "
                                         "name one")  # fmt: skip
    if not files and any(ch in source for ch in "*?["):
        raise ConfigError("task.source", f"{source!r} matches no .parquet, .jsonl, .json or .csv file")
    return files


def check_source(source: str, text_column: str = "text", task: str = "charlm") -> None:
    """``source`` can be read as text (see the module docstring), or a ConfigError naming ``task.source``."""
    if source == "python-docs":
        return
    if source.startswith("hf:"):
        _check_hf(source, text_column)
        return
    if task == "lm" and (files := data_files(source)):
        _check_columns(source, files, text_column)
        return
    files = text_files(source)
    if not any(_check_text_file(source, path) for path in files):
        raise ConfigError("task.source", f"{source!r} has no text")


def text_files(source: str) -> list[Path]:
    """The .txt files a local ``source`` names (the file, or every .txt under the folder, sorted)."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise ConfigError("task.source", f"folder {source!r} has no .txt files")
        return files
    raise ConfigError(
        "task.source", f"{source!r}: no such file or folder; use python-docs, a .txt file or folder, or hf:<name>"
    )


def _check_columns(source: str, files: list[Path], column: str) -> None:
    """The text column is in the first file (Parquet: its schema; JSON Lines, CSV: its first record)."""
    first, kind = files[0], DATA_FILES[files[0].suffix.lower()]
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            columns = pq.read_schema(first).names
        elif kind == "csv":
            import csv

            with first.open(encoding="utf-8", newline="") as f:
                columns = next(csv.reader(f), [])
        else:
            import json

            with first.open(encoding="utf-8") as f:
                record = json.loads(f.readline() or "{}")
            columns = list(record) if isinstance(record, dict) else []
    except Exception as err:  # noqa: BLE001 - a file that does not parse is unusable, whatever the reason
        raise ConfigError("task.source", f"{source!r}: {first.name} does not read as {kind} ({err})") from None
    if column not in columns:
        raise ConfigError("task.text_column", f"{column!r} is not a column of {source!r}; it has {columns}")


def unreadable(source: str, err: Exception) -> ConfigError:
    """The one message for a file that is not UTF-8 text, wherever it is found."""
    return ConfigError("task.source", f"{source!r}: cannot read as UTF-8 text ({err})")


def _check_text_file(source: str, path: Path) -> bool:
    """Whether ``path`` holds text (not only white space); a ConfigError when it is binary or not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    has_text = False
    offset = 0
    try:
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                if b"\0" in chunk:
                    at = offset + chunk.index(b"\0")
                    raise ConfigError("task.source", f"{source!r}: {path.name} is binary (a NUL byte at offset {at}), "
                                                     "not text")  # fmt: skip
                has_text = has_text or bool(decoder.decode(chunk).strip())
                offset += len(chunk)
            decoder.decode(b"", final=True)
    except (OSError, UnicodeDecodeError) as err:
        raise unreadable(source, err) from None
    return has_text


def hf_name(source: str) -> tuple[str, str | None]:
    """``hf:<name>[:<config>]`` -> (name, config or None)."""
    name, _, config = source[len("hf:") :].partition(":")
    if not name:
        raise ConfigError("task.source", f"{source!r}: expected hf:<name>[:<config>]")
    return name, config or None


def hf_cache() -> str:
    """The folder ``datasets`` downloads to (``$HF_DATASETS_CACHE`` read at call time)."""
    import datasets

    return os.environ.get("HF_DATASETS_CACHE") or str(datasets.config.HF_DATASETS_CACHE)


def _check_hf(source: str, text_column: str) -> None:
    """The dataset resolves (its builder: metadata, no data download; offline only from the cache)."""
    name, config = hf_name(source)
    import datasets

    try:
        builder = datasets.load_dataset_builder(name, config, cache_dir=hf_cache())
    except Exception as err:  # noqa: BLE001 - hub, network and format errors all mean: this source is unusable
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError("task.source", f"{source!r}: cannot load ({detail})") from None
    features = builder.info.features
    if features is not None and text_column not in features:
        raise ConfigError("task.text_column", f"{text_column!r} is not a column of {source!r}; it has {list(features)}")
