"""The README and docs/: every command they show parses, every relative link resolves."""

import argparse
import contextlib
import importlib
import io
import re
import shlex
import sys
from pathlib import Path

import pytest

from polyinr.commands import cli
from polyinr.core import config

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 10_240  # bytes: a newcomer's first screen, not a reference manual

FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
SHELL = {"", "bash", "sh", "shell", "console"}
SEPARATORS = {";", "&&", "||", "|", "&"}
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def shell_lines(text: str) -> list[str]:
    """The lines of the fenced shell blocks of a page, backslash continuations joined."""
    lines = []
    for lang, body in FENCE.findall(text):
        if lang in SHELL:
            lines += body.replace("\\\n", " ").splitlines()
    return lines


def split_commands(line: str) -> list[list[str]]:
    """One line of shell as simple commands (words), without comments or env assignments."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, words = [], []
    for token in lexer:
        if token in SEPARATORS:
            commands.append(words)
            words = []
        else:
            words.append(token)
    commands.append(words)
    for words in commands:
        while words and ENV_ASSIGNMENT.match(words[0]):
            words.pop(0)
    return [w for w in commands if w]


def unbracket(words: list[str]) -> list[str]:
    """`[--resolution 128]` (an optional part) as the words it stands for; overrides stay."""
    out = []
    for w in words:
        if not cli.OVERRIDE.match(w):
            w = w.removeprefix("[").removesuffix("]")
        out.append(w)
    return out


def classify(words: list[str]) -> tuple[str, list[str]] | None:
    """(kind, arguments) of a command the docs promise to parse, or None."""
    head, rest = words[0].removeprefix(".venv/bin/"), words[1:]
    if head == "polyinr":
        return "polyinr", rest
    if head == "python" and rest[:1] == ["-m"] and len(rest) > 1:
        module = rest[1]
        if module == "polyinr":
            return "polyinr", rest[2:]
        if module == "benchmarks" or module.startswith("benchmarks."):
            return "benchmarks", rest[1:]
    if head == "torchrun" and "-m" in rest:
        i = rest.index("-m")
        if rest[i + 1 : i + 2] == ["polyinr"]:
            return "polyinr", rest[i + 2 :]
    if head in ("make", "dvc"):
        return head, rest
    return None


def collect() -> dict[str, list[tuple[str, list[str]]]]:
    """{kind: [(where, arguments)]} for every command in the fenced shell blocks."""
    found = {"polyinr": [], "benchmarks": [], "make": [], "dvc": []}
    for page in PAGES:
        for line in shell_lines(page.read_text()):
            try:
                commands = split_commands(line)
            except ValueError:  # output shown beside a command, e.g. unbalanced quotes
                continue
            for words in commands:
                kind = classify(unbracket(words))
                if kind:
                    where = f"{page.relative_to(ROOT)}: {shlex.join(words)}"
                    found[kind[0]].append((where, kind[1]))
    return found


COMMANDS = collect()


def ids(kind: str) -> list[str]:
    return [where for where, _ in COMMANDS[kind]]


def test_the_docs_show_commands_of_every_kind():
    """The collector finds polyinr, benchmarks, make and dvc commands (else the tests are empty)."""
    assert {kind: len(found) for kind, found in COMMANDS.items() if not found} == {}


def test_readme_is_under_10_kib():
    """README.md stays a first screen: under 10,240 bytes."""
    size = (ROOT / "README.md").stat().st_size
    assert size < README_LIMIT, f"README.md is {size} bytes; move reference text to docs/"


def run_main(main, *args) -> tuple[int, str]:
    """(exit status, stderr) of an argparse program's main, SystemExit included."""
    with (
        contextlib.redirect_stderr(io.StringIO()) as err,
        contextlib.redirect_stdout(io.StringIO()),
    ):
        try:
            status = main(*args)
        except SystemExit as e:
            status = e.code
    return status or 0, err.getvalue()


@pytest.mark.parametrize("where, args", COMMANDS["polyinr"], ids=ids("polyinr"))
def test_every_polyinr_command_shown_parses_and_its_overrides_validate(where, args, monkeypatch):
    """`polyinr ...` parses (its command replaced by a recorder) and config.load takes it."""
    monkeypatch.chdir(ROOT)
    parsed = []
    parse_known_args = argparse.ArgumentParser.parse_known_args

    def recording(self, args=None, namespace=None):
        namespace, extra = parse_known_args(self, args, namespace)
        if hasattr(namespace, "func"):
            namespace.func = parsed.append  # parse, never run
        return namespace, extra

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", recording)
    status, err = run_main(cli.main, args)
    assert status == 0 and parsed, f"{where}\n{err}"
    if hasattr(parsed[0], "overrides"):
        config.load(parsed[0].params, parsed[0].overrides)


class Parsed(Exception):
    """Raised by parse_args in place of running a benchmark."""


@pytest.mark.parametrize("where, args", COMMANDS["benchmarks"], ids=ids("benchmarks"))
def test_every_benchmarks_command_shown_parses(where, args, monkeypatch):
    """`python -m benchmarks[.module] ...` parses with the module's argparse; --only names exist."""
    module_name, *argv = args
    module = importlib.import_module(
        "benchmarks.__main__" if module_name == "benchmarks" else module_name
    )
    parse_args = argparse.ArgumentParser.parse_args

    def stop(self, args=None, namespace=None):
        raise Parsed(parse_args(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    monkeypatch.setattr(sys, "argv", [module_name, *argv])
    with pytest.raises(Parsed) as parsed:
        status, err = run_main(module.main)
        pytest.fail(f"{where}: exited {status} before parsing finished\n{err}")
    for name in getattr(parsed.value.args[0], "only", None) or []:
        assert (ROOT / "benchmarks" / f"{name}.py").is_file(), f"{where}: no benchmark {name}"


def make_targets() -> set[str]:
    """The Makefile's targets."""
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([\w.-]+)\s*:(?!=)", text, re.MULTILINE)) - {".PHONY"}


@pytest.mark.parametrize("where, args", COMMANDS["make"], ids=ids("make"))
def test_every_make_target_shown_exists(where, args):
    """`make X` names a target of the Makefile."""
    targets = [a for a in args if not a.startswith("-") and "=" not in a]
    assert targets and set(targets) <= make_targets(), f"{where}: targets {sorted(make_targets())}"


@pytest.mark.parametrize("where, args", COMMANDS["dvc"], ids=ids("dvc"))
def test_every_dvc_command_shown_parses(where, args):
    """`dvc ...` parses with dvc's own argument parser (nothing runs)."""
    from dvc.cli.parser import get_main_parser

    def parse(args):
        get_main_parser().parse_args(args)

    status, err = run_main(parse, args)
    assert status == 0, f"{where}\n{err}"


def without_fences(text: str) -> str:
    """A page without its fenced blocks, whose `#` lines are comments, not headings."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    headings = re.findall(r"^#+\s+(.*)$", without_fences(page.read_text()), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def links() -> list[tuple[Path, str]]:
    """(page, target) for every relative link and image of the README and docs/."""
    found = []
    for page in PAGES:
        text = re.sub(r"`[^`\n]*`", "", without_fences(page.read_text()))  # no inline code
        for target in LINK.findall(text):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, mailto:, ...
                found.append((page, target))
    return found


@pytest.mark.parametrize(
    "page, target", links(), ids=[f"{p.relative_to(ROOT)}->{t}" for p, t in links()]
)
def test_every_relative_link_points_at_an_existing_file_and_heading(page, target):
    """A relative link names an existing file and, for a page's #anchor, one of its headings."""
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    name = file.relative_to(ROOT).as_posix() if file.is_relative_to(ROOT) else str(file)
    assert file.exists(), f"{page.relative_to(ROOT)}: {target} does not exist"
    if anchor and file.suffix == ".md":
        assert anchor in anchors(file), f"{page.relative_to(ROOT)}: no heading #{anchor} in {name}"
