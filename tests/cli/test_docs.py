"""docs/ says what the code does: every option of every command is in its docs table and every
documented option exists; every link between the docs leads somewhere."""

import re

import click
import pytest

from lossx.cli import main
from tests.conftest import REPO

COMMANDS_DOC = REPO / "docs" / "commands.md"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def documented_options(command: str) -> set[str]:
    """The options in the first table of the `lossx COMMAND` section of docs/commands.md."""
    sections = re.split(r"^## ", COMMANDS_DOC.read_text(encoding="utf-8"), flags=re.M)
    section = next(s for s in sections if s.startswith(f"`lossx {command}`"))
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    options = set()
    for row in rows:
        first_cell = row.split(" | ")[0]
        for code in re.findall(r"`([^`]+)`", first_cell):
            options |= {word.split()[0] for word in code.split("/") if word.startswith("--")}
    return options


def click_options(command: click.Command) -> set[str]:
    return {
        name
        for param in command.params
        if isinstance(param, click.Option)
        for name in (*param.opts, *param.secondary_opts)
        if name.startswith("--")
    }


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_option_is_documented_and_every_documented_option_exists(name):
    documented, real = documented_options(name), click_options(main.commands[name])
    assert real - documented == set(), f"lossx {name}: undocumented options"
    assert documented - real == set(), f"lossx {name}: documented options that do not exist"


def test_the_table_reader_sees_what_a_table_holds():
    assert {"--augment", "--no-augment", "--engine", "--out"} <= documented_options("train")
    assert "--optimization" in documented_options("eval")


def _slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_between_the_docs_resolve(doc):
    text = doc.read_text(encoding="utf-8")
    for target, anchor in re.findall(r"\]\(([^)#\s]*\.md|)(#[^)\s]*)?\)", text):
        path = (doc.parent / target) if target else doc
        assert path.is_file(), f"{doc.name}: link to missing {target}"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", path.read_text(encoding="utf-8"), flags=re.M)
            assert anchor[1:] in {_slug(h) for h in headings}, f"{doc.name}: no {target}{anchor}"


def test_the_readmes_own_model_exports_trains_and_checks(tmp_path, monkeypatch):
    """The README's `mymodels.py`, as a reader copies it, through the commands it shows."""
    from tests.cli.test_cli import run_cli

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("Your own model, by import path") :]
    source = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    (tmp_path / "mymodels.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    result = run_cli("export", "mine", "--model", "mymodels:ResNet", "--init", "random",
                     "--seed", "0", "--train", "--loss", "ce")  # fmt: skip
    assert result.exit_code == 0, result.output
    result = run_cli("check", "mine", "--limit", "64")
    assert result.exit_code == 0, result.output
    assert "train_ce/grad.block.weight" in result.stdout


def test_the_architecture_names_every_module_under_its_package():
    """docs/architecture.md's tree lists every module of src/lossx under its own package."""
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    tree = text[text.index("```\nsrc/lossx/") : text.index("```", text.index("src/lossx/"))]
    sections = re.split(r"\n  (?=\w+/ )", tree)
    listed = {s.split("/", 1)[0]: set(re.findall(r"\b(\w+)\.py\b", s)) for s in sections[1:]}
    for path in sorted((REPO / "src" / "lossx").glob("*/*.py")):
        if path.stem not in ("__init__", "__main__"):
            assert path.stem in listed.get(path.parent.name, set()), f"{path} is not in the tree"
