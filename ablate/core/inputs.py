"""Reading what a user hands us: study and config files, ``--set`` values, and the one error they all raise.

A file is a regular file of at most MAX_FILE_BYTES of UTF-8; its YAML has no aliases and is nested at most
MAX_DEPTH deep; every problem is a :class:`ConfigError` whose message is one line (control characters escaped,
long values cut), ``<source>: <key>: <problem>``. Standard library and yaml only.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

MAX_FILE_BYTES = 1_000_000  # a study file is a page of YAML; more is a mistake (or an attack) before it is copied
MAX_DEPTH = 32  # nesting of a YAML file; studies need 4
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class ConfigError(ValueError):
    """A bad input: ``str()`` is one line, ``<source>: <key>: <problem>``."""

    def __init__(self, key: str, problem: str, source: str = "") -> None:
        self.key, self.problem, self.source = key, problem, source
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        return _one_line(f"{where}{_clip(self.key, 120)}: {_clip(self.problem, 400)}")

    def at(self, source: str, prefix: str = "") -> ConfigError:
        """The same error, located in ``source`` and under the key ``prefix``."""
        if not self.key:
            key = prefix
        elif prefix and not self.key.startswith(prefix + "."):
            key = f"{prefix}.{self.key}"
        else:
            key = self.key
        return ConfigError(key, self.problem, self.source or source)


def _one_line(text: str) -> str:
    """Control characters (a newline in a YAML key, say) escaped, so an error is always one line."""
    return CONTROL.sub(lambda m: repr(m.group(0))[1:-1], text)


def _clip(text: Any, limit: int) -> str:
    text = str(text)
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text):,} characters)"


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error message stays one short line whatever the input."""
    if isinstance(value, int) and value.bit_length() > 3 * limit:  # repr() of a huge int is slow, or refused
        return f"an int of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Loader(yaml.SafeLoader):
    """YAML without aliases, and nested at most MAX_DEPTH deep; it knows the key it is reading, for the error.

    An alias costs nothing to load, but every copy, dump or error message of the value expands it: ten nested
    aliases of ten items each are 10**10 items (the "billion laughs"). Study files need none, so none are read.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.path: list[Any] = []

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.path.append(index.value if isinstance(index, yaml.ScalarNode) else index)
        try:
            if self.check_event(yaml.AliasEvent):
                line = self.peek_event().start_mark.line + 1
                raise ConfigError(self.key or "yaml", f"YAML aliases (*name) are not allowed; write the value out "
                                                      f"(line {line})")  # fmt: skip
            if len(self.path) > MAX_DEPTH:  # named by its mapping keys: 32 list indices say nothing
                keys = ".".join(str(p) for p in self.path if p is not None and not isinstance(p, int))
                raise ConfigError(keys or "yaml", f"nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self.path.pop()

    @property
    def key(self) -> str:
        """The dotted key of the node being read: ``scientific.model.num_heads[1]``."""
        key = ""
        for part in self.path:
            if isinstance(part, int):
                key += f"[{part}]"
            elif part is not None:
                key += f".{part}" if key else str(part)
        return key


def parse_yaml(text: str, source: str = "") -> Any:
    """The value of YAML ``text`` (no aliases, bounded nesting), or a one-line ConfigError naming ``source``."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except ConfigError as err:
        raise err.at(source) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f"line {mark.line + 1}" if mark is not None else "line ?"
        problem = str(getattr(err, "problem", None) or "").strip()
        raise ConfigError("yaml", f"not valid YAML ({line}{': ' + short(problem, 80) if problem else ''})",
                          source) from None  # fmt: skip
    except (ValueError, OverflowError, RecursionError) as err:  # a value YAML types but Python cannot hold
        detail = short(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__, 120)
        raise ConfigError("yaml", f"a value cannot be read ({detail})", source) from None


def read_text(path: str | Path) -> str:
    """A study or config file's text: a regular file of at most MAX_FILE_BYTES of UTF-8, else a ConfigError."""
    path = Path(path)
    if not path.exists():
        raise ConfigError("file", "not found", str(path))
    if not path.is_file():
        raise ConfigError("file", "not a regular file", str(path))
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise ConfigError("file", f"cannot read ({err.strerror or err})", str(path)) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError("file", f"larger than {MAX_FILE_BYTES:,} bytes; a study file is a page of YAML", str(path))
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError("file", f"not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); save it as "
                                  "UTF-8", str(path)) from None  # fmt: skip


def read_yaml(path: str | Path, text: str | None = None) -> dict:
    """The mapping in a YAML file (or in its ``text``, already read), or a ConfigError naming the file."""
    text = read_text(path) if text is None else text
    data = parse_yaml(text, str(path))
    if not isinstance(data, dict):
        raise ConfigError("file", "must contain a YAML mapping at the top level", str(path))
    return data
