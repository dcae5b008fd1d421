"""The `p3b-deploy` commands written in README.md and docs/, and a check of each against the real parser.

Used by tests/test_docs_commands.py (every command's stage, flags and choices exist) and by the slow
test that runs the "Prune for your device" page's sequence. Commands are read from fenced code blocks
(``` or ~~~, indented or not) and from inline code spans that start with a command. A command is
`p3b-deploy ...`, `.venv/bin/p3b-deploy ...`, `python -m p3b_deploy ...` (any interpreter, also
`torchrun ... -m p3b_deploy`) or `python -m p3b_deploy.cli.STAGE ...`; `\\` continues a line, `#`
starts a comment, `&&`, `||`, `;` and ` | ` separate commands.

Synopsis notation is understood, not executed: `[--flag VALUE]` is an optional flag, `a|b|...` lists
alternative values, each of which must be one of the flag's choices where the flag has choices
(deployment target names for `--target` / `--targets`, comma lists included). A command without
that notation must also parse completely (required arguments, types).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)$")
_INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
_SEPARATORS = re.compile(r"\s(?:&&|\|\||;|\|)\s")
_SYNOPSIS = re.compile(r"[\[\]]|\||\.\.\.")


@dataclass(frozen=True)
class Command:
    """One CLI invocation found in a markdown file."""
    source: str  # "README.md:42"
    text: str  # the command as written (continuations joined)
    argv: tuple[str, ...]  # tokens after the program: stage, then its arguments
    inline: bool = False  # from an inline code span in prose: a mention, checked but not parsed whole

    @property
    def synopsis(self) -> bool:
        """Whether it uses [optional] / a|b notation (then it is checked flag by flag, not parsed)."""
        return any(_SYNOPSIS.search(t) for t in self.argv)


def markdown_files() -> list[Path]:
    """README.md and every page under docs/ (the benchmark results linked from there are not docs)."""
    docs = REPO / "docs"
    pages = [p for p in sorted(docs.rglob("*.md")) if not p.is_relative_to(docs / "results")]
    return [REPO / "README.md", *pages]


def code_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, body) of every fenced code block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent, start, body = m["fence"], len(m["indent"]), i + 2, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        blocks.append((start, "\n".join(body)))
        i += 1
    return blocks


def _prose(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    out, inside = [], None
    for n, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if m and (inside is None or line.strip().startswith(inside)):
            inside = None if inside else m["fence"]
            continue
        if inside is None:
            out.append((n, line))
    return out


def _argv_of(tokens: list[str]) -> list[str] | None:
    """The arguments after the p3b-deploy program in one shell command, or None if it runs something else."""
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):  # VAR=value p3b-deploy ...
        tokens = tokens[1:]
    if tokens and (tokens[0] == "p3b-deploy" or tokens[0].endswith("/p3b-deploy")):
        return tokens[1:]
    for i, t in enumerate(tokens):  # python -m p3b_deploy, torchrun ... -m p3b_deploy
        if t == "-m" and i + 1 < len(tokens):
            mod = tokens[i + 1]
            if mod == "p3b_deploy":
                return tokens[i + 2:]
            if mod.startswith("p3b_deploy.cli."):  # python -m p3b_deploy.cli.bench ...: that stage's own entry
                return [mod.rsplit(".", 1)[1].replace("_", "-"), *tokens[i + 2:]]
    return None


def commands_in(text: str, source: str = "<text>") -> list[Command]:
    """Every p3b-deploy command in a shell snippet (lines joined at trailing backslashes)."""
    out = []
    logical, first = "", None
    for n, line in enumerate(text.splitlines() + [""], 1):
        if first is None:
            first = n
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1] + " "
            continue
        logical += line
        for part in _SEPARATORS.split(logical):
            try:
                tokens = shlex.split(part, comments=True)
            except ValueError:  # unbalanced quote: prose, not a command
                continue
            argv = _argv_of(tokens)
            if argv is not None:
                out.append(Command(f"{source}:{first}", " ".join(tokens), tuple(argv)))
        logical, first = "", None
    return out


def commands_in_markdown(path: Path) -> list[Command]:
    """Commands in a markdown file's code blocks and in its inline code spans."""
    text = path.read_text(encoding="utf-8")
    name = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name
    out = []
    for start, body in code_blocks(text):
        for c in commands_in(body, name):
            line = int(c.source.rsplit(":", 1)[1]) + start - 1
            out.append(Command(f"{name}:{line}", c.text, c.argv))
    for n, line in _prose(text):
        for span in _INLINE.findall(line):
            out.extend(Command(f"{name}:{n}", c.text, c.argv, inline=True) for c in commands_in(span, name))
    return out


def build_parser() -> argparse.ArgumentParser:
    """The real `p3b-deploy` parser (its construction imports no torch)."""
    from p3b_deploy.cli import build_parser as real
    return real()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("p3b-deploy's parser has no stages")


def _target_names() -> list[str]:
    from p3b_deploy.targets import ALIASES, TARGETS  # torch-free
    return [*TARGETS, *ALIASES]


# flags whose values are names from a registry rather than argparse choices (comma lists allowed)
_NAMED = {"target": _target_names(), "targets": _target_names()}


def _alternatives(value: str) -> list[str]:
    """`index|dense|auto|...` -> the values it names (brackets and '...' dropped)."""
    return [v for v in value.strip("[]").split("|") if v and v != "..."]


def problems(cmd: Command, parser: argparse.ArgumentParser) -> list[str]:
    """What is wrong with one command against the parser: unknown stage, flag or choice; a parse error."""
    stages = _subparsers(parser)
    argv = list(cmd.argv)
    top = {s for a in parser._actions for s in a.option_strings}
    while argv and argv[0].startswith("-"):  # p3b-deploy -v STAGE ...
        if argv[0] not in top:
            return [f"unknown option {argv[0]!r} before the stage"]
        argv.pop(0)
    if not argv:
        return []  # `p3b-deploy` or `p3b-deploy --help`
    stage, args = argv[0].strip("[]"), argv[1:]
    if cmd.inline and (stage == "..." or stage.isupper()):  # `p3b-deploy STAGE --help` in prose
        return []
    if stage not in stages:
        return [f"unknown stage {stage!r} (stages: {', '.join(stages)})"]
    sp = stages[stage]
    flags = sp._option_string_actions
    out = []
    tokens = [t.strip("[]") for t in args]
    for i, tok in enumerate(tokens):
        if not tok.startswith("--"):
            continue
        flag, _, inline = tok.partition("=")
        action = flags.get(flag)
        if action is None:
            out.append(f"{stage}: unknown flag {flag}")
            continue
        choices = action.choices if action.choices is not None else _NAMED.get(action.dest)
        if choices is None or action.nargs == 0:
            continue
        value = inline or (tokens[i + 1] if i + 1 < len(tokens) and not tokens[i + 1].startswith("-") else None)
        if value is None or value.isupper():  # a bare optional-value flag (--int8) or a placeholder (MODE)
            continue
        values = [v for alt in _alternatives(value) for v in (alt.split(",") if action.dest in _NAMED else [alt])]
        for v in values:
            if v not in choices:
                out.append(f"{stage}: {flag} {v!r} is not one of {sorted(map(str, choices))}")
    if not out and not cmd.synopsis and not cmd.inline:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                parser.parse_args(list(cmd.argv))
            except SystemExit as e:
                if e.code:
                    last = err.getvalue().strip().splitlines()
                    out.append(f"does not parse: {last[-1] if last else e.code}")
    return out
