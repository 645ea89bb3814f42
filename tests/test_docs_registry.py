"""The docs cannot go stale: docs/cli.md names every flag of the command line and every registered method under the
flag that selects it, docs/methods.md's table has a row for every registered row, modifier and training mode, and the
README's tables have every row of the table. Registering a method, or adding a flag, without its line fails here."""

import re
from pathlib import Path

import config
import registry

DOCS = Path(__file__).resolve().parent.parent


def table_cells(path: Path) -> list[list[str]]:
    """The cells of every Markdown table row of a file."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in path.read_text().splitlines()
            if line.startswith("|")]  # fmt: skip


def has_row(cells: list[list[str]], title: str) -> bool:
    """Whether some row's first cell is ``title``, or ``title`` followed by a note ("EM+APL (from the BoostLU paper)";
    "LL-R, LL-Ct, LL-Cp" names three)."""
    names = [n.strip() for row in cells for n in row[0].split(",")]
    return any(n == title or n.startswith(title + " (") for n in names)


def test_cli_md_names_every_flag():
    text = (DOCS / "docs" / "cli.md").read_text()
    parser = config.get_args_parser()
    flags = {s for action in parser._actions for s in action.option_strings if s.startswith("--") and s != "--help"}
    missing = sorted(f for f in flags if not re.search(re.escape(f) + r"(?![A-Za-z0-9_])", text))
    assert not missing, f"docs/cli.md does not describe {missing}"


def test_cli_md_names_every_registered_method_under_its_flag():
    lines = (DOCS / "docs" / "cli.md").read_text().splitlines()
    for kind, selector in registry.SELECTOR.items():
        line = next(row for row in lines if row.startswith(f"| `--{selector}`") or f"`--{selector}`," in row)
        missing = [name for name in registry.names(kind) if f"`{name}`" not in line]
        assert not missing, f"docs/cli.md's --{selector} line does not name {missing}"


def test_methods_md_table_has_every_row_modifier_and_mode():
    cells = table_cells(DOCS / "docs" / "methods.md")
    default_mode = config.get_args_parser().get_default("train_mode")
    titles = {title for key, title, _flags in registry.rows() if "+" not in key}
    titles |= {m.title for m in registry.entries(registry.MODIFIER)}
    titles |= {m.title for m in registry.entries(registry.MODE) if m.name != default_mode}
    missing = sorted(t for t in titles if not has_row(cells, t) and not has_row(cells, f"+ {t}"))
    assert not missing, f"docs/methods.md's table has no row for {missing}"


def test_readme_tables_have_every_row():
    cells = table_cells(DOCS / "README.md")
    rows = [title for _key, title, _flags in registry.rows()]
    second_column = [[row[2]] for row in cells if len(row) > 2]  # the synthetic table has two methods per line
    missing = [t for t in rows if not has_row(cells, t) and not has_row(second_column, t)]
    assert not missing, f"README.md's tables have no row for {missing}"


def test_a_registered_method_missing_from_the_docs_fails_here():
    """The checks above see a method the docs do not name."""
    entry = registry.register(registry.Method("undocumented", registry.LOSS, title="Undocumented", loss=lambda b: None))
    try:
        checks = (test_cli_md_names_every_registered_method_under_its_flag,
                  test_methods_md_table_has_every_row_modifier_and_mode, test_readme_tables_have_every_row)  # fmt: skip
        for check in checks:
            try:
                check()
            except AssertionError as err:
                assert "undocumented" in str(err).lower()
            else:
                raise AssertionError(f"{check.__name__} passed without the method {entry.name!r} in the docs")
    finally:
        registry.unregister("undocumented")
