"""No method or dataset name is tested outside its entry: train.py, config.py, losses.py and models.py compare no
value with a registered method's or dataset's name (a decision about one method or dataset belongs in its entry, as
a field or a hook). Defaults (``default="an"``) and names in messages and docstrings are not comparisons."""

import ast
from pathlib import Path

import pytest

import datasets
import registry

REPO = Path(__file__).resolve().parent.parent


def names() -> set[str]:
    return set(registry.REGISTRY) | set(datasets.DATASET_INFO)


def compared_names(source: str) -> list[tuple[int, str]]:
    """(line, name) of every comparison (``==``, ``!=``, ``in``, ``not in``; a tuple or list operand counts its
    items) or ``match`` case whose operand is a string constant that is a method or dataset name."""
    found = []
    known = names()

    def constants(node) -> list[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return [v for e in node.elts for v in constants(e)]
        return []

    for node in ast.walk(ast.parse(source)):
        operands = []
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif isinstance(node, ast.MatchValue):
            operands = [node.value]
        found += [(node.lineno, v) for op in operands for v in constants(op) if v in known]
    return found


@pytest.mark.parametrize("module", ["train.py", "config.py", "losses.py", "models.py"])
def test_no_method_or_dataset_name_is_tested_outside_its_entry(module):
    assert compared_names((REPO / module).read_text()) == []


def test_the_check_sees_a_name_tested():
    code = 'if cfg.dataset == "synthetic":\n    pass\nok = scheme in ("LL-Ct", "LL-Cp")\nnot_a_test = "LL-R"\n'
    assert compared_names(code) == [(1, "synthetic"), (3, "LL-Ct"), (3, "LL-Cp")]
