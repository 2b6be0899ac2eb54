"""A multi grader's `calculate_output`: arithmetic over its graders' scores, evaluated without `eval`.

The formula is parsed with `ast` and only a whitelist is accepted: numbers, the graders' names, `+ - * / ^ **`
(OpenAI's `^` is a power, as in its docs, not Python's xor), `%`, unary minus, parentheses and the functions
min, max, abs, floor, ceil, exp, sqrt, log. Anything else (attributes, subscripts, calls of other names,
comprehensions, strings) is refused when the job is created.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

FUNCTIONS: dict[str, Callable[..., float]] = {
    "min": min, "max": max, "abs": abs, "floor": math.floor, "ceil": math.ceil, "exp": math.exp,
    "sqrt": math.sqrt, "log": math.log,
}
_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.Pow: operator.pow, ast.Mod: operator.mod,
}
MAX_NODES = 200


def parse_formula(text: str, names: set[str]) -> ast.Expression:
    """The checked tree; ValueError says what is not allowed."""
    try:  # `^` is a power with a power's precedence (0.5 * b ^ 2 is 0.5 * b**2); strings are not allowed anyway
        tree = ast.parse(text.strip().replace("^", "**"), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"{text!r} is not a formula: {e.msg}") from None
    nodes = list(ast.walk(tree))
    if len(nodes) > MAX_NODES:
        raise ValueError(f"the formula is too long (more than {MAX_NODES} parts)")
    for node in nodes:
        if isinstance(node, ast.Expression | ast.Load) or type(node) in _BINARY or isinstance(node, ast.USub | ast.UAdd):
            continue
        if isinstance(node, ast.BinOp | ast.UnaryOp):
            if isinstance(node, ast.BinOp) and type(node.op) not in _BINARY:
                raise ValueError(f"operator {type(node.op).__name__} is not allowed (use + - * / ^)")
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
            continue
        if isinstance(node, ast.Name):
            if node.id not in names and node.id not in FUNCTIONS:
                raise ValueError(f"{node.id!r} is not one of the graders ({', '.join(sorted(names))})")
            continue
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS or node.keywords:
                raise ValueError(f"only the functions {', '.join(FUNCTIONS)} may be called")
            if not node.args:
                raise ValueError(f"{node.func.id}() needs an argument")
            continue
        raise ValueError(f"{ast.unparse(node) if hasattr(ast, 'unparse') else type(node).__name__!r} is not allowed "
                         "in a formula (numbers, grader names, + - * / ^ and min/max/abs/floor/ceil/exp/sqrt/log)")
    return tree


def evaluate(tree: ast.Expression, scores: dict[str, float]) -> float:
    def ev(node: Any) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            return float(node.value)  # type: ignore[arg-type]  # parse_formula admitted numbers only
        if isinstance(node, ast.Name):
            return float(scores[node.id])
        if isinstance(node, ast.UnaryOp):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(b) > 64:
                raise ValueError("exponent larger than 64")
            return float(_BINARY[type(node.op)](a, b))
        if isinstance(node, ast.Call):
            assert isinstance(node.func, ast.Name)
            return float(FUNCTIONS[node.func.id](*(ev(a) for a in node.args)))
        raise ValueError(type(node).__name__)  # parse_formula admitted nothing else

    try:
        return ev(tree)
    except (ZeroDivisionError, OverflowError, ValueError) as e:
        raise ValueError(f"calculate_output failed on scores {scores}: {e}") from None
