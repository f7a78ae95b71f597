"""Every command the README, docs/ and the study files' headers print runs: each `make` target exists, each
`ablate` and `python -m ablate.retune` command parses with the real parser (no training), and each file it names
exists. A placeholder (FILE, STUDY.yaml, <file>, NAME ...) stands for a study file and is checked as one."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
from support.runs import ROOT

from ablate import cli, retune

PLACEHOLDER = re.compile(r"^(<[^>]+>|[A-Z][A-Z_]*(\.yaml)?|NAME|FILE|\.\.\.)$")
COMMAND = re.compile(r"^(?:\.venv/bin/)?(make|ablate|python -m ablate\.retune|\.venv/bin/python -m ablate\.retune|"
                     r"deploy/slurm/submit)\s")  # fmt: skip


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "studies").rglob("*.yaml"))]


def commands_in(path: Path) -> list[str]:
    """Commands in code spans and code blocks (markdown), or in comment lines (a study file's header)."""
    text = path.read_text()
    if path.suffix == ".yaml":
        candidates = re.findall(r"`([^`]+)`", text) + [line.lstrip("# ").strip() for line in text.splitlines()
                                                       if line.startswith("#")]  # fmt: skip
    else:
        blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
        candidates = [line for block in blocks for line in block.splitlines()]
        candidates += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    found = []
    for line in candidates:
        line = line.split("  #")[0].split(" # ")[0].strip()
        for part in re.split(r"\s*(?:&&|;|\(or:)\s*", line):
            part = part.strip().removesuffix(")")
            if COMMAND.match(part):
                found.append(part)
    return found


ALL = sorted({(p.relative_to(ROOT).as_posix(), c) for p in documents() for c in commands_in(p)})


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))


def check_file(arg: str) -> None:
    if PLACEHOLDER.match(arg) or "$" in arg:
        return
    if arg.endswith((".yaml", ".yml")):
        assert (ROOT / arg).is_file(), f"{arg}: no such file"


def parses(parser: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return parser.parse_args(args)
        except SystemExit:
            raise AssertionError(err.getvalue().strip()) from None


def test_the_docs_print_commands_at_all():
    documented = {c.split()[0] for _, c in ALL}
    assert {"make", "ablate", ".venv/bin/ablate", "deploy/slurm/submit"} <= documented and len(ALL) > 20


@pytest.mark.parametrize(("where", "command"), ALL)
def test_every_printed_command_names_real_targets_options_and_files(where, command):
    words = shlex.split(command.replace("\\", ""))
    words = [w for w in words if not w.startswith(("ABLATE_", "MLFLOW_"))]
    if words[0] == "make":
        targets = [w for w in words[1:] if "=" not in w]
        assert set(targets) <= make_targets(), f"{where}: {command}: no make target {set(targets) - make_targets()}"
        for w in words[1:]:
            if w.startswith("STUDY="):
                check_file(w.removeprefix("STUDY="))
        return
    if words[0] == "deploy/slurm/submit":
        assert (ROOT / words[0]).is_file()
        check_file(words[1])
        return
    if "ablate.retune" in command:
        args = words[words.index("ablate.retune") + 1:]
        parser = retune.parser()
    else:
        args = words[1:]
        parser = cli.parser()
    args = ["studies/smoke.yaml" if PLACEHOLDER.match(a) else a for a in args]
    parsed = parses(parser, args)
    for value in vars(parsed).values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                check_file(item)
