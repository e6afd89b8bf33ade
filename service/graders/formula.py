"""`calculate_output` of multi graders: a safe arithmetic evaluator, never `eval`.

Grammar: numbers, the multi grader's own names, `+ - * / ^` (`^` is power, as in OpenAI's
formulas; `**` works too), parentheses, unary minus, and the functions
`min max abs floor ceil exp sqrt log`. The formula is parsed once with `ast` and only those node
types are accepted; evaluation walks the tree.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

FUNCTIONS: dict[str, Callable[..., float]] = {
    "min": min,
    "max": max,
    "abs": abs,
    "floor": math.floor,
    "ceil": math.ceil,
    "exp": math.exp,
    "sqrt": math.sqrt,
    "log": math.log,
}
BINARY: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
UNARY: dict[type, Callable[[float], float]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_LENGTH = 2000


class FormulaError(ValueError):
    pass


class Formula:
    def __init__(self, source: str, names: set[str]) -> None:
        if len(source) > MAX_LENGTH:
            raise FormulaError(f"calculate_output is longer than {MAX_LENGTH} characters")
        try:
            # `^` is power and binds like `**` (tighter than * and +); Python's `^` would bind looser.
            tree = ast.parse(source.strip().replace("^", "**"), mode="eval")
        except SyntaxError as exc:
            raise FormulaError(f"calculate_output {source!r} is not a valid formula: {exc.msg}") from None
        self.source, self.names = source, names
        self._check(tree.body)
        self._tree = tree.body

    def _check(self, node: ast.AST) -> None:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return
        if isinstance(node, ast.Name):
            if node.id not in self.names:
                known = ", ".join(sorted(self.names)) or "none"
                raise FormulaError(
                    f"calculate_output uses {node.id!r}, which is not a grader of this multi grader (graders: {known})"
                )
            return
        if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
            self._check(node.left)
            self._check(node.right)
            return
        if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
            self._check(node.operand)
            return
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
            if node.func.id not in FUNCTIONS:
                raise FormulaError(
                    f"calculate_output calls {node.func.id!r}; allowed functions: {', '.join(FUNCTIONS)}"
                )
            if not node.args:
                raise FormulaError(f"{node.func.id}() needs at least one argument")
            for arg in node.args:
                self._check(arg)
            return
        raise FormulaError(
            f"calculate_output may only use numbers, grader names, + - * / ^, parentheses and "
            f"{', '.join(FUNCTIONS)}; found {ast.unparse(node)!r}"
        )

    def evaluate(self, values: Mapping[str, float]) -> float:
        """The formula's value; ArithmeticError/ValueError for a domain error (division by zero...)."""
        result = float(self._eval(self._tree, values))
        if not math.isfinite(result):
            raise ValueError(f"calculate_output gave {result}")
        return result

    def _eval(self, node: Any, values: Mapping[str, float]) -> float:
        if isinstance(node, ast.Constant):
            return float(node.value)  # type: ignore[arg-type]  # _check admitted only int/float constants
        if isinstance(node, ast.Name):
            return float(values[node.id])
        if isinstance(node, ast.BinOp):
            return BINARY[type(node.op)](self._eval(node.left, values), self._eval(node.right, values))
        if isinstance(node, ast.UnaryOp):
            return UNARY[type(node.op)](self._eval(node.operand, values))
        args = [self._eval(arg, values) for arg in node.args]
        return float(FUNCTIONS[node.func.id](*args))
