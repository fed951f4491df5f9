"""Every command the project shows its users parses: each ``python -m learner.main ...``,
``python -m learner.evaluate ...``, ``python -m rollout.generate ...``, ``python -m
rewards.http_server ...`` and ``python bench/<script>.py ...`` written in the README, docs/, the
configs, deploy/ and the modules' and scripts' own docstrings; and every learner.main flag the
pages tell users to add (`--resume auto`, `--overwrite`). The README said "add `--overwrite`"
while the loader refused `--overwrite` alone: nothing read the pages' commands.

A ``learner.main`` command goes through ``load_config`` (so its config file, flags and values are
checked as a run would check them, before Ray). Any other goes through its own ``main`` as far as
its argument parser, which is stopped there: the arguments are parsed, nothing runs; the config
flags after ``--`` (learner.evaluate's, the benches that train runs) go through ``load_config``.
A command with a placeholder (``...``, ``DIR``, ``<run>``) is a shape, not a command, and is left
out, as is a flag named without the value it needs (`--rollout.num_workers`: a mention) and
docs/reliability.md's quotes of bad input.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from common.config import Config, ConfigError, load_config
from tests.conftest import REPO

_START = r"python (?:-m (?:learner|rollout|rewards)\.[a-z_]+|bench/[a-z_]+\.py)"
#: a command in running text: up to where the shell or the prose takes over
COMMAND = re.compile(_START + r"""(?:'[^'\n]*'|"[^"\n]*"|[^\n&|;)(`#'"])*""")
PLACEHOLDER = re.compile(r"\.\.\.|<[a-z-]+>|\b(?:DIR|PATH|VALUE)\b|\[--")
#: a program named in prose, not a command: alone, each of these would only print its usage
MENTIONS = {f"python -m {m}" for m in ("learner.evaluate", "rollout.generate", "rewards.http_server")}


def _sources() -> list[Path]:
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    files += sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "deploy").glob("*.yaml"))
    for package in ("bench", "common", "learner", "rollout", "rewards"):
        files += sorted((REPO / package).rglob("*.py"))
    return files


def _texts(path: Path) -> list[tuple[str, str | None]]:
    """The places a command can be written in ``path``, each as one line with the last YAML
    block before it (a Markdown page's, else None): a page's fenced blocks line by line and its
    inline code (which may wrap), any other file's lines."""
    text = path.read_text().replace("\\\n", " ")  # a shell line continued
    if path.suffix != ".md":
        return [(line, None) for line in text.splitlines()]
    out: list[tuple[str, str | None]] = []
    yaml_before: str | None = None
    for prose, lang, block in re.findall(r"(.*?)(?:^```([a-z]*)\n(.*?)^```|\Z)", text, flags=re.S | re.M):
        out += [(" ".join(span.split()), yaml_before) for span in re.findall(r"`([^`]+)`", prose)]
        out += [(line, yaml_before) for line in block.splitlines()]
        yaml_before = block if lang == "yaml" else yaml_before
    return out


def commands() -> list[tuple[str, str, str | None]]:
    """(file, command, the page's YAML block before it) for every command the project writes
    out, placeholders and bare mentions of a program that needs arguments left out."""
    found: set[tuple[str, str, str | None]] = set()
    for path in _sources():
        for line, yaml_before in _texts(path):
            for m in COMMAND.finditer(line):
                if line[: m.start()].endswith(('"', "'", "prog=")):  # an argument parser's prog
                    continue
                command = m.group(0).strip()
                if not PLACEHOLDER.search(command) and command not in MENTIONS:
                    found.add((path.relative_to(REPO).as_posix(), command, yaml_before))
    return sorted(found, key=lambda f: f[:2])


def _config_field(flag: str) -> Any:
    """The type of the config field a ``--section.field`` flag sets, or None if it sets none
    (another program's flag: learner.evaluate's ``--steps``)."""
    kind: Any = Config
    for part in flag.removeprefix("--").split("."):
        fields = kind.model_fields if isinstance(kind, type) and issubclass(kind, BaseModel) else {}
        if part not in fields:
            return None
        kind = fields[part].annotation
    return kind


def flags() -> list[tuple[str, str]]:
    """(page, flags) for every learner.main flag a page writes out to be added to a command:
    each inline `--section.field VALUE` (or `=VALUE`), and a yes/no field's flag alone."""
    found: set[tuple[str, str]] = set()
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        if path.name == "reliability.md":  # its tables quote bad input on purpose
            continue
        for span in re.findall(r"`(--[^`]+)`", path.read_text()):
            words = shlex.split(span)
            kind = _config_field(words[0].split("=")[0])
            valued = "=" in words[0] or len(words) > 1
            if kind is not None and (valued or kind is bool) and not PLACEHOLDER.search(span):
                found.add((path.relative_to(REPO).as_posix(), span))
    return sorted(found)


class _Parsed(Exception):
    def __init__(self, args: argparse.Namespace):
        super().__init__()
        self.namespace = args


def _entry(program: str) -> Any:
    """The ``main`` of ``python -m <module>`` or ``python bench/<script>.py``."""
    if program.endswith(".py"):
        name = f"_doc_{Path(program).stem}"
        spec = importlib.util.spec_from_file_location(name, REPO / program)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # where its dataclasses look their module up
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(program)
    return module.main


def test_the_commands_are_found():
    """The extraction itself: every kind of command is there, with its flags and quoted values."""
    found = commands()
    programs = {shlex.split(c)[2 if c.startswith("python -m") else 1] for _, c, _ in found}
    assert {"learner.main", "learner.evaluate", "rollout.generate", "rewards.http_server"} <= programs
    assert {"bench/oracle_gap.py", "bench/overhead.py", "bench/fixed_cost.py"} <= programs
    shown = {(where, c) for where, c, _ in found}
    assert ("README.md", "python -m learner.main --config configs/toy.yaml --rollout.k_schedule='{}'") in shown
    assert any("--prompt-file mine.txt --seeds 20 --best-of 4" in c for _, c in shown)
    assert ("README.md", "python -m learner.evaluate --run runs/l_sweep/L2 --run runs/l_sweep/L3") in {
        (w, " ".join(c.split()[:7])) for w, c in shown
    }, "inline code that wraps"
    assert not [c for _, c in shown if "..." in c or "DIR" in c], "placeholders are left out"
    (mine,) = [y for w, c, y in found if c == "python -m learner.main --config my.yaml"]
    assert mine is not None and "my_rewards:ColourMatch" in mine
    added = {f for _, f in flags()}
    assert {"--overwrite", "--resume auto", "--rollout.k_schedule='{}'"} <= added
    assert "--rollout.num_workers" not in added and "--steps" not in added
    assert len(found) > 60


@pytest.mark.parametrize(
    ("where", "command", "yaml_before"), [pytest.param(*c, id=" ".join(c[:2])) for c in commands()]
)
def test_every_command_the_project_shows_parses(where, command, yaml_before, monkeypatch, capsys, tmp_path):
    _check(where, command, yaml_before, monkeypatch, capsys, tmp_path)


@pytest.mark.parametrize(
    ("command", "why"),
    [
        ("python -m learner.main --overwrite maybe", "Input should be a valid boolean"),
        ("python -m learner.main --rollout.kk=3", "unrecognized arguments: --rollout.kk=3"),
        (
            "python -m learner.evaluate --run runs/digits --seeds 0",
            "exits 2: error: invalid command line: argument --seed",
        ),
        ("python -m learner.evaluate --run runs/digits -- --rollout.nope=1", "unrecognized arguments"),
        ("python bench/oracle_gap.py --backend toy -- --learner.iteratons=9", "unrecognized arguments"),
        ("python -m rollout.generate --run runs/digits --prompt x --sed 0", "unrecognized arguments: --sed 0"),
        ("python bench/overhead.py --workers two", "invalid int value: 'two'"),
        ("python -m learner.main --config my.yaml", "config file not found: my.yaml"),
    ],
)
def test_a_command_that_would_not_run_fails_here(command, why, monkeypatch, capsys, tmp_path):
    with pytest.raises(pytest.fail.Exception, match=re.escape(why)):
        _check("a page", command, None, monkeypatch, capsys, tmp_path)


def _check(where: str, command: str, yaml_before: str | None, monkeypatch, capsys, tmp_path: Path) -> None:
    """Fails the test, naming the page, unless ``command`` parses (module docstring). A config
    file the command names that is not in the checkout is the one the page shows just before it
    (docs/rewards.md's ``my.yaml``)."""
    monkeypatch.chdir(REPO)  # relative paths (configs/...) are the checkout's, as the docs mean
    words = shlex.split(command)
    program, argv = (words[2], words[3:]) if words[1] == "-m" else (words[1], words[2:])
    if "--help" in argv:
        return  # test_config.py and each CLI's own tests read the help
    if program == "learner.main":
        if "--config" in argv and not (REPO / argv[argv.index("--config") + 1]).exists() and yaml_before:
            at = argv.index("--config") + 1
            (tmp_path / argv[at]).write_text(yaml_before)
            argv[at] = str(tmp_path / argv[at])
        try:
            load_config(argv)
        except ConfigError as e:
            pytest.fail(f"{where}: `{command}`: {e}")
        return
    parse = argparse.ArgumentParser.parse_args

    def parsed(self, args=None, namespace=None):
        raise _Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parsed)
    monkeypatch.setattr(sys, "argv", [program, *argv])  # for a main() that reads sys.argv itself
    main = _entry(program)
    try:
        main(argv) if main.__code__.co_argcount else main()
    except _Parsed:
        pass
    except SystemExit as e:
        pytest.fail(f"{where}: `{command}` exits {e.code}: {capsys.readouterr().err.strip()}")
    else:
        pytest.fail(f"{where}: `{command}` never parsed its arguments")
    if "--" in argv:  # config flags, for the runs the program starts or evaluates
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse)  # the config loader's own
        try:
            load_config(argv[argv.index("--") + 1 :])
        except ConfigError as e:
            pytest.fail(f"{where}: `{command}`: {e}")
