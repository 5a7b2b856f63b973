"""The commands and pointers of README.md, docs/*.md and deploy/README.md still work as written, checked without
running any job.

- A fenced shell block (sh, bash, shell; console: its `$ ` lines) is read as bash reads it: `\\` continuations joined, comments
  dropped, `&&` / `;` / `|` split, redirections and `NAME=value` prefixes left out, and the command after
  `ray job submit ... --` read as a command of its own.
- `cirflow ...` is parsed by the real command line's parser (flows/cli.py, built by `main`): an unknown
  subcommand, flag or choice fails. A synopsis line (`[--seed N]`, `{a,b}`, `...`) and a command written inline in
  prose or a table are checked word by word instead: each subcommand, flag and choice must exist.
- `make TARGET` names a target of the Makefile; `python bench/X.py --flag` names a script that takes each flag
  (declared in its argparse parser, else listed by its `--help`).
- Every repository path written in code (`deploy/docker/search.Dockerfile`, a command's `configs/...yaml`) exists,
  every `cirflow.a.b.Name` resolves to a module that defines the name, and every relative link [x](path#anchor)
  resolves to a file (and, in a markdown file, a heading).

Other tools' commands (prefect, ray, kubectl, docker, buildah, pip) are checked for their paths only.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import io
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md")), REPO / "deploy" / "README.md"]
SHELL_BLOCKS = {"sh", "bash", "console", "shell"}
README_MAX_LINES = 150  # the README a newcomer reads in five minutes; the depth lives in docs/
# Top-level entries of the repository that the docs name: a path that starts with one of them must exist. Paths
# under workdir/, .venv/ and the like are made by the commands, not kept in the repository.
TRACKED_TOP = {".ci", "bench", "configs", "core", "deploy", "docs", "export", "flows", "indexing", "models", "tests",
               "Makefile", "README.md", "pyproject.toml", "setup.py", "requirements-gpu.txt"}
PATH_LIKE = re.compile(r"[\w.-]+(?:/[\w.-]*)*")
DOTTED = re.compile(r"\bcirflow(?:\.\w+)+(?::\w+)?")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`([^`]+)`")
SHELL_OPERATORS = set("();<>|&")
# Paths a page names on purpose although they are gone: records of what was run then.
RECORDS = {("docs/benchmarks.md", "bench/cuda_parity.py"):
           "the 2026-11-28 GPU run, kept as a record; the script was replaced by bench/gpu_check.py"}


@dataclass(frozen=True)
class Doc:
    path: Path
    blocks: list[tuple[str, str, int]]  # (language, text, line of its first line)
    prose: str  # the text outside fenced blocks, those blocks blanked (line numbers kept)

    def where(self, offset_or_line: int, *, is_line: bool = False) -> str:
        line = offset_or_line if is_line else self.prose.count("\n", 0, offset_or_line) + 1
        return f"{ids(self.path)}:{line}"


def read_doc(path: Path) -> Doc:
    blocks, prose, fence, lang, start, body = [], [], None, "", 0, []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        opening = re.match(r"\s*(`{3,})\s*([\w+-]*)", line)
        if fence is None and opening:
            fence, lang, start, body = opening.group(1), opening.group(2).lower(), number + 1, []
            prose.append("")
        elif fence is not None and line.strip() == fence:
            blocks.append((lang, "\n".join(body), start))
            fence = None
            prose.append("")
        elif fence is not None:
            body.append(line)
            prose.append("")
        else:
            prose.append(line)
    assert fence is None, f"{ids(path)}: a code block opened at line {start - 1} is never closed"
    return Doc(path, blocks, "\n".join(prose))


@functools.cache
def doc(path: Path) -> Doc:
    return read_doc(path)


def strip_comment(line: str) -> str:
    """The line without its shell comment: a `#` that begins a word outside quotes."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def shell_lines(block: str, console: bool = False) -> list[tuple[int, list[str]]]:
    """The simple commands of a shell block, as word lists with the block line each starts on (0-based): env
    prefixes and redirections left out. In a console block only the lines after a `$ ` prompt are commands (the
    others are output)."""
    commands, number = [], 0
    for line in re.split(r"(?<!\\)\n", block):  # a line and its `\` continuations
        start, number = number, number + line.count("\n") + 1
        line = line.replace("\\\n", " ").strip()
        if console and not line.startswith("$ "):
            continue
        lexer = shlex.shlex(strip_comment(line.removeprefix("$ ")), posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, ""
        words, skip = [], False
        for token in lexer:
            if skip:
                skip = False
            elif set(token) <= SHELL_OPERATORS:
                if "<" in token or ">" in token:  # a redirection: its target goes too (and a `2` before `>`)
                    skip = True
                    if words and words[-1].isdigit():
                        words.pop()
                else:
                    commands.append((start, words))
                    words = []
            else:
                words.append(token)
        commands.append((start, words))
    cleaned = []
    for start, words in commands:
        while words and (re.match(r"[A-Za-z_]\w*=", words[0]) or words[0] in ("exec", "sudo", "env", "time")):
            words = words[1:]  # RAY_ADDRESS=... cirflow ...: the command is what follows
        if words:
            cleaned.append((start, words))
    return cleaned


def shell_commands(block: str, console: bool = False) -> list[list[str]]:
    return [words for _, words in shell_lines(block, console)]


def inline_commands(d: Doc) -> list[tuple[list[str], str]]:
    """Commands written in code spans of the prose and tables: `cirflow ...`, `make ...`, `python bench/...`."""
    found = []
    for match in INLINE_CODE.finditer(d.prose):
        text = " ".join(match.group(1).split())
        first = text.split(" ", 1)[0]
        if (Path(first).name in ("cirflow", "make") and " " in text) or (
                re.fullmatch(r"(\S*/)?python[\d.]*", first) and " bench/" in text):
            with contextlib.suppress(ValueError):
                found.append((shlex.split(text), d.where(match.start())))
    return found


# --- the cirflow command line -----------------------------------------------------------------------------------

class _Built(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


@functools.cache
def cli_parser() -> argparse.ArgumentParser:
    """The parser `cirflow` runs with, taken from `cirflow.flows.cli.main` at the moment it parses."""
    from cirflow.flows import cli

    def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _Built(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        try:
            cli.main([])
        except _Built as built:
            return built.parser
    raise AssertionError("cirflow.flows.cli.main parsed nothing")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {name: p for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name, p in action.choices.items()}


def parse_strictly(words: list[str]) -> str | None:
    """None when `cirflow WORDS` parses, else argparse's message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            cli_parser().parse_args(words)
    except SystemExit as e:
        return None if e.code == 0 else err.getvalue().strip().splitlines()[-1]
    return None


def check_words(words: list[str]) -> str | None:
    """A synopsis or inline command, word by word: subcommands, flags and choices exist; values and optional
    parts (`[--seed N]`, `...`) are placeholders."""
    parser, path, expects_value = cli_parser(), ["cirflow"], False
    positional_choices = None
    for raw in words:
        word = raw.strip("[]")
        if not word or word in ("...", "|"):
            continue
        if expects_value and not word.startswith("-"):
            expects_value = False
            continue
        expects_value = False
        subs = subcommands(parser)
        if word.startswith("-"):
            flag = word.split("=", 1)[0]
            action = parser._option_string_actions.get(flag)
            if action is None:
                return f"{' '.join(path)} has no option {flag}"
            expects_value = action.nargs != 0 and "=" not in word
        elif subs:
            if word not in subs:
                return f"{' '.join(path)} has no subcommand {word!r} (it has: {', '.join(subs)})"
            parser = subs[word]
            path.append(word)
            positional_choices = next((a.choices for a in parser._actions if not a.option_strings and a.choices
                                       and not isinstance(a, argparse._SubParsersAction)), None)
        elif positional_choices is not None and not word.isupper():
            names = word.strip("{}").split(",") if word.startswith("{") else [word]
            unknown = [n for n in names if n not in positional_choices]
            if unknown:
                return f"{' '.join(path)} has no choice {unknown} (it has: {', '.join(positional_choices)})"
            positional_choices = None
    return None


def is_synopsis(words: list[str]) -> bool:
    return any(w.startswith("[") or w.endswith("]") or w in ("...", "|") or w.startswith("{") for w in words)


# --- make and bench ---------------------------------------------------------------------------------------------

@functools.cache
def make_targets() -> frozenset[str]:
    text = (REPO / "Makefile").read_text()
    return frozenset(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.MULTILINE))


@functools.cache
def bench_flags(script: str) -> frozenset[str] | None:
    """The options a bench script's argparse parser declares (read from its source: `--help` imports the script's
    whole stack, 2-3 s a script), or None when it uses no argparse."""
    tree = ast.parse((REPO / script).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    if "argparse" not in imported:
        return None
    flags = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            names = [a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")]
            flags.update(names)
            if any(isinstance(k.value, ast.Attribute) and k.value.attr == "BooleanOptionalAction"
                   for k in node.keywords if k.arg == "action"):
                flags.update(f"--no-{n[2:]}" for n in names if n.startswith("--"))
    return frozenset(flags | {"-h", "--help"})


@functools.cache
def bench_help(script: str) -> str:
    """`--help` of a bench script: asked only for an option its source does not show declared (one built in a
    loop, a parent parser), so that a flag the script really takes never fails."""
    proc = subprocess.run([sys.executable, script, "--help"], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode == 0, f"{script} --help failed:\n{proc.stdout[-2000:]}"
    return proc.stdout


def bench_takes(script: str, flag: str) -> bool:
    declared = bench_flags(script)
    if declared is None or flag in declared:
        return declared is not None
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", bench_help(script)) is not None


def bench_script(words: list[str]) -> str | None:
    if re.fullmatch(r"(\S*/)?python[\d.]*", words[0]) and len(words) > 1 and words[1].startswith("bench/"):
        return words[1]
    return None


# --- paths, modules, links --------------------------------------------------------------------------------------

def missing_path(text: str, d: Doc) -> str | None:
    """The repository path `text` names when it looks like one and is missing, else None."""
    text = re.sub(r"(\.py):\w+$", r"\1", text)  # flows/catalog_flow.py:catalog, an entrypoint
    if not PATH_LIKE.fullmatch(text) or "..." in text:
        return None
    first = text.split("/", 1)[0]
    if first in TRACKED_TOP:
        root = REPO
    elif "/" in text and d.path.parent != REPO and (d.path.parent / first).exists():
        root = d.path.parent  # deploy/README.md's docker/flows.Dockerfile
    else:
        return None
    name = str((root / text).relative_to(REPO))
    return None if (root / text).exists() or (ids(d.path), name) in RECORDS else name


def words_paths(words: list[str]) -> list[str]:
    return [part for w in words for part in (w, w.split("=", 1)[-1])]


@functools.cache
def module_names(module: Path) -> dict[str, set[str]]:
    """Top-level names a module defines, each with the names its class body defines."""
    names: dict[str, set[str]] = {}
    for node in ast.parse(module.read_text()).body:
        if isinstance(node, ast.ClassDef):
            names[node.name] = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                             ast.ClassDef))} | {
                t.id for n in node.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = set()
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    names[target.id] = set()
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = set()
    return names


def unresolved(dotted: str) -> str | None:
    """Why `cirflow.a.b.Name[.member]` names nothing in this tree (the stage folders are the cirflow.* packages),
    or None."""
    parts = dotted.replace(":", ".").split(".")[1:]
    where, i = REPO, 0
    while i < len(parts) and (where / parts[i]).is_dir():
        where, i = where / parts[i], i + 1
    if i < len(parts) and (where / f"{parts[i]}.py").is_file():
        where, i = where / f"{parts[i]}.py", i + 1
    if where == REPO:
        return f"{dotted}: no stage {parts[0]!r}"
    rest = parts[i:]
    if not rest:
        return None
    module = where if where.suffix == ".py" else where / "__init__.py"
    names = module_names(module) if module.is_file() else {}
    if rest[0] not in names:
        what = "module or name" if module.name == "__init__.py" else "name"
        return f"{dotted}: {ids(where)} has no {what} {rest[0]!r}"
    if len(rest) > 1 and names[rest[0]] and rest[1] not in names[rest[0]]:
        return f"{dotted}: {rest[0]} in {module.relative_to(REPO)} has no {rest[1]!r}"
    return None


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@functools.cache
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", doc(path).prose, re.MULTILINE):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
    return frozenset(f"{base}-{n}" if n else base for base, count in seen.items() for n in range(count))


# --- the tests --------------------------------------------------------------------------------------------------

def ids(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def fenced_commands(d: Doc) -> list[tuple[list[str], str]]:
    found = []
    for lang, text, start in d.blocks:
        if lang in SHELL_BLOCKS:
            for offset, words in shell_lines(text, console=lang == "console"):
                found.append((words, d.where(start + offset, is_line=True)))
    return found


def expand(words: list[str]) -> list[list[str]]:
    """A command, and the command after `ray job submit ... --` (what the job runs)."""
    if words[0] == "ray" and "--" in words:
        return [words, words[words.index("--") + 1:]]
    return [words]


@pytest.mark.parametrize("path", DOCS, ids=ids)
def test_documented_commands_parse(path: Path) -> None:
    """cirflow lines parse with the real parser, make targets exist, bench scripts take the flags shown."""
    d = doc(path)
    commands = [(w, where, True) for words, where in fenced_commands(d) for w in expand(words)] + [
        (w, where, False) for words, where in inline_commands(d) for w in expand(words)]
    problems = []
    for words, where, fenced in commands:
        shown = " ".join(words)
        if Path(words[0]).name == "cirflow":
            args = words[1:]
            why = parse_strictly(args) if fenced and not is_synopsis(args) else check_words(args)
            if why:
                problems.append(f"{where}: `{shown}`: {why}")
        elif words[0] == "make":
            for target in (w for w in words[1:] if not w.startswith("-") and "=" not in w):
                if target not in make_targets():
                    problems.append(f"{where}: `{shown}`: the Makefile has no target {target!r}")
        elif script := bench_script(words):
            if (ids(path), script) in RECORDS:
                continue
            if not (REPO / script).is_file():
                problems.append(f"{where}: `{shown}`: no {script}")
                continue
            flags = {w.strip("[]").split("=", 1)[0] for w in words[2:] if w.strip("[]").startswith("--")}
            for flag in sorted(flags):
                if bench_flags(script) is None:
                    problems.append(f"{where}: `{shown}`: {script} takes no options (no argparse), given {flag}")
                elif not bench_takes(script, flag):
                    problems.append(f"{where}: `{shown}`: {script} takes no {flag} (not in its --help)")
    assert not problems, "documented commands that would not run as written:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", DOCS, ids=ids)
def test_documented_paths_and_modules_exist(path: Path) -> None:
    """Repository paths in code spans and commands exist; cirflow.x.y names and `from cirflow... import` resolve."""
    d = doc(path)
    problems = []
    for words, where in fenced_commands(d):
        for text in words_paths(words):
            if missing := missing_path(text, d):
                problems.append(f"{where}: `{' '.join(words)}` names {missing}, which does not exist")
    for match in INLINE_CODE.finditer(d.prose):
        span = " ".join(match.group(1).split())
        for text in {span, *words_paths(span.split())}:
            if missing := missing_path(text.strip("(),;"), d):
                problems.append(f"{d.where(match.start())}: `{span}` names {missing}, which does not exist")
    code = [(m.group(1), d.where(m.start())) for m in INLINE_CODE.finditer(d.prose)] + [
        (text, d.where(start, is_line=True)) for _, text, start in d.blocks]
    for text, where in code:
        for dotted in DOTTED.findall(text):
            if why := unresolved(dotted):
                problems.append(f"{where}: {why}")
        for module, names in re.findall(r"from (cirflow(?:\.\w+)+) import ([\w, ]+)", text):
            for name in (n.strip() for n in names.split(",") if n.strip()):
                if why := unresolved(f"{module}.{name}"):
                    problems.append(f"{where}: {why}")
    assert not problems, "\n".join(sorted(set(problems)))


def broken_links(d: Doc) -> list[str]:
    problems = []
    for match in LINK.finditer(d.prose):
        target = match.group(1)
        if re.match(r"[a-z][\w+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (d.path.parent / file).resolve() if file else d.path
        if not resolved.exists():
            problems.append(f"{d.where(match.start())}: link to {target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{d.where(match.start())}: link to {target}: {resolved.name} has no heading "
                            f"#{anchor} (it has: {', '.join(sorted(anchors(resolved)))})")
    return problems


@pytest.mark.parametrize("path", DOCS, ids=ids)
def test_relative_links_resolve(path: Path) -> None:
    problems = broken_links(doc(path))
    assert not problems, "\n".join(problems)


def test_the_readme_is_short_and_links_every_docs_page() -> None:
    text = README.read_text()
    lines = text.count("\n")
    assert lines < README_MAX_LINES, f"README.md has {lines} lines: move the depth into docs/ (under {README_MAX_LINES})"
    linked = {(REPO / m.group(1).partition("#")[0]).resolve() for m in LINK.finditer(doc(README).prose)}
    unlinked = [ids(p) for p in DOCS if p.parent == REPO / "docs" and p.resolve() not in linked]
    assert not unlinked, f"docs pages README.md does not link: {unlinked}"
    fresh = [words for words, _ in fenced_commands(doc(README))]
    for command in (["make", "demo"], ["make", "test"]):
        assert command in fresh, f"README.md's shell blocks lost the fresh-machine command `{' '.join(command)}`"


def test_the_checks_catch_what_they_are_for(tmp_path: Path) -> None:
    """The checks themselves: a wrong subcommand, flag or choice, target, bench flag, path or link fails."""
    assert parse_strictly(["index", "build", "--embeddings", "E", "--queries", "q.parquet", "index_type=hnsw"]) is None
    assert "unrecognized arguments: --no-such-flag" in parse_strictly(["serve", "--index", "x", "--no-such-flag"])
    assert "invalid choice" in parse_strictly(["indx", "build"])
    assert check_words(["data", "shapes", "--out", "DIR", "[--seed", "N]", "[--scale", "S]"]) is None
    assert check_words(["flow", "{catalog,training,pipeline}", "[--config", "FILE]", "[key.path=value", "...]"]) is None
    assert "no option --sead" in check_words(["data", "shapes", "[--sead", "N]"])
    assert "no choice ['nightly']" in check_words(["flow", "{catalog,nightly}"])
    assert "no subcommand 'shape'" in check_words(["data", "shape"])
    assert shell_commands("RAY_ADDRESS=auto cirflow train \\\n  a=1  # why\nray stop >/dev/null 2>&1 && echo '#x'") == [
        ["cirflow", "train", "a=1"], ["ray", "stop"], ["echo", "#x"]]
    assert shell_commands("$ make demo\nmake: *** no output parsed", console=True) == [["make", "demo"]]
    assert "demo" in make_targets() and "no-such-target" not in make_targets()
    assert {"--backbone", "--no-in-process"} <= bench_flags("bench/ablation.py") and bench_flags("bench/report.py") is None
    page = tmp_path / "page.md"
    page.write_text("# A page\n\n[ok](#a-page) [gone](#nowhere) [file](nowhere.md)\n\n```sh\n[x](y.md)\n```\n")
    assert [p.split(": ", 1)[1] for p in broken_links(read_doc(page))] == [
        "link to #nowhere: page.md has no heading #nowhere (it has: a-page)",
        "link to nowhere.md: no such file"]
    readme = doc(README)
    assert missing_path("deploy/no.Dockerfile", readme) == "deploy/no.Dockerfile"
    assert missing_path("workdir/indexes/shapes-shop", readme) is None and missing_path("Makefile", readme) is None
    assert missing_path("flows/catalog_flow.py:catalog", readme) is None
    assert unresolved("cirflow.flows.cli.tcp_port") is None and "has no name 'nope'" in unresolved("cirflow.flows.cli.nope")
