"""The documentation stays true: README's Python examples run as written, and every `deepatlas ...` command line
and every script command line shown in README.md and docs/*.md names a subcommand, flags and files that exist."""

import re
import shlex
from pathlib import Path

import pytest
import torch

from deepatlas.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ENVIRONMENT = r"^(?:[A-Z_]+=\S* )*"
CLI_COMMAND = re.compile(ENVIRONMENT + r"(?:\S*/)?deepatlas (?=[a-z])|^torchrun .*-m deepatlas\.cli ")
SCRIPT_COMMAND = re.compile(ENVIRONMENT + r"(?:\S*/)?python3? (?=(?:benchmarks|examples|scripts)/\S+\.py)")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)


def command_lines(text: str) -> list[str]:
    """Lines of fenced or indented (4 spaces) code blocks, continuation lines joined, comments removed."""
    commands, pending, fenced = [], "", False
    for raw in text.splitlines():
        if raw.startswith("```"):
            fenced = not fenced
            continue
        if not (fenced or raw.startswith("    ")):
            continue
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        commands.append(re.sub(r"\s+#.*$", "", line))
    return commands


def expand_seq(line: str) -> str:
    return re.sub(r"\$\(seq (\d+) (\d+)\)", lambda m: " ".join(map(str, range(int(m[1]), int(m[2]) + 1))), line)


def documented(pattern: re.Pattern) -> list[tuple[str, str]]:
    found = []
    for path in DOCUMENTS:
        for line in command_lines(path.read_text()):
            match = pattern.search(line)
            if match:
                found.append((f"{path.relative_to(ROOT)}: {line}", line[match.end():].strip()))
    return found


CLI_LINES = documented(CLI_COMMAND)
SCRIPT_LINES = documented(SCRIPT_COMMAND)


def test_the_documents_show_commands_to_check():
    assert len(CLI_LINES) >= 20 and len(SCRIPT_LINES) >= 5


def test_readme_python_examples_run_as_written():
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["moved"].shape == namespace["image"].shape
    assert namespace["ddf"].grad is not None and namespace["ddf"].grad.abs().sum() > 0
    assert namespace["seg"].dtype == torch.uint8 and namespace["dice"].shape == (1, 4)
    inside = namespace["soft"].sum(1)[:, 12:-12, 12:-12, 12:-12]  # |ddf| < 12 voxels: every sample point inside
    assert torch.allclose(inside, torch.ones(()), atol=1e-5)
    assert namespace["det"].shape == (1, 1, 96, 112, 96)


@pytest.mark.parametrize("where, command", CLI_LINES, ids=[where for where, _ in CLI_LINES])
def test_documented_cli_commands_parse(where, command):
    assert_parses(where, shlex.split(expand_seq(command)))


def assert_parses(where: str, words: list[str]):
    try:
        build_parser().parse_args(words)
    except SystemExit as error:
        pytest.fail(f"{where}\n`deepatlas {' '.join(words)}` does not parse (exit {error.code})")


@pytest.mark.parametrize("where, command", SCRIPT_LINES, ids=[where for where, _ in SCRIPT_LINES])
def test_documented_script_commands_name_existing_scripts_and_flags(where, command):
    script, *words = shlex.split(expand_seq(command))
    assert (ROOT / script).is_file(), f"{where}: no {script}"
    source = (ROOT / script).read_text()
    if "from deepatlas.cli import main" in source:  # a wrapper that hands its arguments to `deepatlas`
        assert_parses(where, words)
        return
    for flag in (word for word in words if word.startswith("--")):
        assert f'"{flag}"' in source, f"{where}: {script} has no option {flag}"


def test_files_named_in_the_documents_exist():
    pattern = re.compile(r"(?<![\w/.])((?:scripts|benchmarks|tests|examples|csrc|deepatlas_cuda|python|docs)/"
                         r"[\w./-]*\w\.(?:py|sh|h|cpp|cu|md|png|txt))")
    named = {(path.relative_to(ROOT), name) for path in DOCUMENTS for name in pattern.findall(path.read_text())}
    assert len(named) >= 20
    missing = sorted(f"{where}: {name}" for where, name in named if not (ROOT / name).exists())
    assert not missing, "\n".join(missing)


def test_relative_links_in_the_documents_resolve():
    broken = [f"{path.relative_to(ROOT)}: {target}" for path in DOCUMENTS
              for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text())
              if not (path.parent / target).exists()]
    assert not broken, "\n".join(broken)


def test_tests_named_in_the_documents_exist():
    sources = "".join(path.read_text() for path in (ROOT / "tests").glob("*.py"))
    named = {name for path in DOCUMENTS for name in re.findall(r"`(test_\w+)`", path.read_text())}
    missing = sorted(name for name in named if not re.search(rf"\bdef {name}\b", sources))
    assert not missing, f"named in docs/ or README.md but not defined in tests/: {missing}"
