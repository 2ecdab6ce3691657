"""The library's functions fit on a screen and take few parameters: at most 60 lines and 8 parameters each."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import model_runner.sink

MAX_LINES = 60
MAX_PARAMETERS = 8
SINK = Path(model_runner.sink.__file__).parent
MODULES = sorted(SINK.rglob("*.py"))


def too_large(source: str) -> list[str]:
    """
    The functions of a module that are too long or take too many parameters.

    :param source: The module's text.
    :return: One line per function that breaks a limit, naming it and the limit.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        arguments = node.args
        positional = [*arguments.posonlyargs, *arguments.args]
        # A method's receiver is not a parameter its caller passes; **kwargs and *args count as one each.
        if positional and positional[0].arg in ("self", "cls"):
            positional = positional[1:]
        parameters = len(positional) + len(arguments.kwonlyargs)
        parameters += (arguments.vararg is not None) + (arguments.kwarg is not None)
        first = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])
        lines = (node.end_lineno or node.lineno) - first + 1
        if lines > MAX_LINES:
            found.append(f"{node.name} is {lines} lines long, more than {MAX_LINES}")
        if parameters > MAX_PARAMETERS:
            found.append(f"{node.name} takes {parameters} parameters, more than {MAX_PARAMETERS}")
    return found


def test_the_check_finds_a_long_function_and_one_with_many_parameters() -> None:
    long_body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    source = f"def long():\n{long_body}\n\nasync def wide(self, a, b, c, d, e, f, *, g, h, i):\n    pass\n"
    assert too_large(source) == [
        f"long is {MAX_LINES + 1} lines long, more than {MAX_LINES}",
        f"wide takes 9 parameters, more than {MAX_PARAMETERS}",
    ]
    assert too_large("def fits(a, b, *args, **kwargs):\n    pass\n") == []


@pytest.mark.parametrize("path", MODULES, ids=[str(path.relative_to(SINK)) for path in MODULES])
def test_no_function_of_the_library_is_too_long_or_takes_too_many_parameters(path: Path) -> None:
    assert too_large(path.read_text(encoding="utf-8")) == []
