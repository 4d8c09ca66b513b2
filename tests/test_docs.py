"""What README.md and docs/*.md tell a user to run is there: every flag a documented command line names is one
its command's parser takes (read from its own `--help`) and every value it gives one of a fixed set is in that
set; every file or folder of the repository the pages name exists; every `python -m engine.…` module they name
imports; every environment variable they name is read by the code; the Space front matter shown is the one
scripts/make_space.py writes; and the README's engine.plan command lines run (exit 0) on the real 2.0 config.
The pages cannot drift from the command lines silently."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

from scripts.make_space import make_space
from tests.paths import REPO, real_config

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README = PAGES[0].read_text(encoding="utf-8")
# one command line's start: the studio, an engine module, a benchmark or a script
COMMAND = re.compile(r"launch\.py|-m (engine(?:\.[a-z_]+)+)|(?:bench|scripts)/[a-z0-9_]+\.py")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# a path of the repository a page names: under one of its top folders, or the studio's entry point
REPO_PATH = re.compile(r"(?<![\w./-])(?:(?:engine|app|bench|scripts|tests|docs)/[\w/.*-]*|launch\.py)")
ENGINE_MODULE = re.compile(r"(?<![\w./-])-m (engine(?:\.[a-z_]+)+)")


def page_code(page: Path) -> list[str]:
    """The page's code: each line of its fenced blocks, and each inline code span (which may wrap a line)."""
    text = page.read_text(encoding="utf-8")
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return [line for block in blocks for line in block.splitlines()] + re.findall(r"`([^`]+)`", prose)


def documented_commands() -> dict[str, set[str]]:
    """{command ('launch.py', 'engine.plan', 'bench/x.py'): the flags the pages give it}; a command's flags are
    those after it in the same code, up to the next command or a shell comment."""
    commands: dict[str, set[str]] = {}
    for page in PAGES:
        for code in page_code(page):
            starts = list(COMMAND.finditer(code))
            for here, after in zip(starts, starts[1:] + [None]):
                words = code[here.end():after.start() if after else len(code)].split("#")[0]
                commands.setdefault(here.group(1) or here.group(0), set()).update(FLAG.findall(words))
    return commands


@functools.cache
def help_text(command: str) -> str:
    """What `command --help` prints, run in this process as its `__main__`."""
    argv, out = sys.argv, io.StringIO()
    sys.argv = [command, "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
            if command.endswith(".py"):
                runpy.run_path(str(REPO / command), run_name="__main__")
            else:
                runpy.run_module(command, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = argv
    assert done.value.code in (0, None), f"{command} --help exited {done.value.code}"
    return out.getvalue()


COMMANDS = documented_commands()


def test_the_pages_name_the_command_lines_a_user_runs():
    assert {"launch.py", "engine.server", "engine.plan", "engine.tiny", "engine.tts", "engine.imagine"} <= set(COMMANDS)


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # a module run again as __main__
@pytest.mark.parametrize("command", sorted(c for c in COMMANDS if COMMANDS[c]))
def test_every_documented_flag_is_one_the_command_takes(command):
    if command.endswith(".py"):
        assert (REPO / command).is_file(), f"{command} is named by the docs but does not exist"
    taken = set(FLAG.findall(help_text(command)))
    assert COMMANDS[command] - taken == set(), f"documented for {command} but not in its --help"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_repository_path_the_page_names_exists(page):
    named = set(REPO_PATH.findall(page.read_text(encoding="utf-8")))
    missing = {p for p in named if not (any(REPO.glob(p)) if "*" in p else (REPO / p).exists())}
    assert missing == set(), f"{page.name} names paths that do not exist"


def test_every_file_the_readmes_layout_table_names_is_in_its_folder():
    table = README.split("## Layout")[1].split("\n\n")[1]
    missing = []
    for row in table.splitlines()[2:]:
        _, folders, job, _ = row.split("|")
        for name in re.findall(r"`([\w.]+\.py|\w+/)`", job):
            if not any((REPO / folder / name).exists() for folder in re.findall(r"`([\w/]+/)`", folders)):
                missing.append(f"{folders.strip()} {name}")
    assert missing == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_engine_module_the_page_runs_imports(page):
    modules = set(ENGINE_MODULE.findall(page.read_text(encoding="utf-8")))
    assert {m for m in modules if importlib.util.find_spec(m) is None} == set()


def documented_defaults(command: str) -> set[tuple[str, str]]:
    """{(flag, value)} of each `[--flag value]` a page writes after `command`, a literal value (not a placeholder
    such as PATH_OR_HUB_ID or T): the default it means (the server's synopsis writes its defaults so; other
    commands' synopses write example values: `[--release preview]`)."""
    defaults = set()
    for page in PAGES:
        for code in page_code(page):
            starts = list(COMMAND.finditer(code))
            for here, after in zip(starts, starts[1:] + [None]):
                words = code[here.end():after.start() if after else len(code)]
                for flag, value in re.findall(r"\[(--[a-z][a-z0-9-]*) ([^]\s]+)\]", words):
                    if (here.group(1) or here.group(0)) == command and not value.isupper():
                        defaults.add((flag, value))
    return defaults


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
@pytest.mark.parametrize("flag,value", sorted(documented_defaults("engine.server")), ids=" ".join)
def test_the_servers_documented_defaults_are_those_its_help_states(flag, value):
    entries = re.split(r"\n  (?=-)", help_text("engine.server"))
    entry = " ".join(next(e for e in entries if re.match(rf"(-\w, )?{flag}(?![\w-])", e)).split())
    assert re.search(rf"default:? {re.escape(value)}\b", entry), f"the page says {flag} defaults to {value}: {entry}"


# `--flag value` or `--flag a|b|c` (a table cell escapes the bar: a\\|b) in a page's code
FLAG_VALUES = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)[ =]"
                         r"([a-z0-9][a-z0-9.-]*(?:\\?\|[a-z0-9][a-z0-9.-]*)*)(?![\w:/=,])")


def documented_values() -> set[tuple[str | None, str, str]]:
    """{(command or None when the code names none, flag, value)} of each value a page gives a flag."""
    values = set()
    for page in PAGES:
        for code in page_code(page):
            starts = list(COMMAND.finditer(code))
            spans = [(None, code)] if not starts else [
                (here.group(1) or here.group(0), code[here.end():after.start() if after else len(code)].split("#")[0])
                for here, after in zip(starts, starts[1:] + [None])]
            for command, words in spans:
                for flag, written in FLAG_VALUES.findall(words):
                    values |= {(command, flag, value) for value in written.replace("\\", "").split("|")}
    return values


def choices(command: str, flag: str) -> list[str] | None:
    """The values `command --help` lists for `flag` ({a,b}), [] when it does not take the flag, None when it takes
    any value."""
    found = re.search(rf"\n  (?:-\w, )?{flag} \{{([^}}]*)\}}", help_text(command))
    if found:
        return found.group(1).split(",")
    return None if re.search(rf"\n  (?:-\w, )?{flag}(?![\w-])", help_text(command)) else []


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
@pytest.mark.parametrize("command,flag,value", sorted(documented_values(), key=str), ids=lambda v: str(v))
def test_every_documented_flag_value_is_one_the_command_takes(command, flag, value):
    candidates = [command] if command else [c for c in sorted(COMMANDS) if choices(c, flag) != []]
    assert candidates, f"no documented command takes {flag}"
    takes = [choices(c, flag) for c in candidates]
    assert any(t is None or value in t for t in takes), f"{value!r} for {flag}: {dict(zip(candidates, takes))}"


# bench/ files that are no benchmark: the helpers the benchmarks share, and the GGUF export bench/vs_llamacpp.py uses
NOT_BENCHMARKS = {"cli.py", "gguf_export.py"}


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
@pytest.mark.parametrize("bench", sorted(p.name for p in (REPO / "bench").glob("*.py") if p.name not in NOT_BENCHMARKS))
def test_every_benchmark_takes_json_as_the_readme_says(bench):
    assert "benchmarks (" in README and "each prints ratios and takes `--json`" in README
    assert "--json" in FLAG.findall(help_text(f"bench/{bench}"))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_environment_variable_or_constant_the_page_names_is_in_the_code(page):
    named = set(re.findall(r"`\$?([A-Z][A-Z0-9]*_[A-Z0-9_]+)(?:=[^`]*)?`", page.read_text(encoding="utf-8")))
    code = "\n".join(p.read_text(encoding="utf-8") for folder in ("engine", "app", "scripts", "bench", "tests")
                     for p in (REPO / folder).rglob("*.py")) + (REPO / "launch.py").read_text(encoding="utf-8")
    read = {name for name in named if f'"{name}"' in code}  # os.environ["NAME"], os.environ.get("NAME")
    defined = {name for name in named if re.search(rf"^{name}\b[^=\n]*=", code, re.M)}  # a constant: ERROR_CODES
    assert named - read - defined == set()


def test_the_readme_shows_the_spaces_front_matter_and_it_pins_the_uis_gradio(tmp_path):
    front_matter = (make_space(tmp_path / "space") / "README.md").read_text().split("---\n")[1]
    assert README.split("```yaml\n---\n")[1].split("---\n```")[0] == front_matter
    gradio_pin = re.search(r"^gradio==(\S+)$", (REPO / "requirements-ui.txt").read_text(), re.M).group(1)
    assert f"sdk_version: {gradio_pin}\n" in front_matter


def readme_plan_commands() -> list[list[str]]:
    """The README's `python -m engine.plan …` lines as argv, optional parts ([--json]) dropped."""
    lines = [code for code in page_code(REPO / "README.md") if code.startswith("python -m engine.plan --config DIR")]
    return [shlex.split(re.sub(r"\[[^]]*\]", "", " ".join(line.split()))[len("python -m engine.plan "):])
            for line in lines]


@pytest.mark.parametrize("argv", readme_plan_commands(), ids=" ".join)
def test_the_readmes_plan_commands_fit_the_real_model(argv, capsys):
    from engine.placement.planner import main
    argv = [str(real_config("ming-flash-omni-2.0")) if a == "DIR" else a for a in argv]
    assert main(argv) == 0, capsys.readouterr().err
    assert "predicted decode" in capsys.readouterr().out
