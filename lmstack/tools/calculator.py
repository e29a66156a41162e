"""The calculator: evaluates arithmetic only.

It parses with `ast` and walks the tree itself: numbers, + - * / // % **, unary minus/plus and
parentheses; names, calls, attributes, subscripts and everything else are refused (there is no
`eval`). Its work is bounded up front (expression length, exponent size, integer size), and a
deadline is checked at every node, so a call returns within its time limit without needing a
thread or process to kill.
"""

from __future__ import annotations

import ast
import math
import operator
import time
import warnings

from lmstack.tools.registry import Tool

MAX_EXPRESSION = 500  # characters
MAX_INT_BITS = 4000  # ~1200 digits: every intermediate integer stays this small (bounded work)
MAX_EXPONENT = 10_000
TIME_LIMIT = 1.0  # seconds

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


class CalcError(Exception):
    pass


def calculator(expression: str, time_limit: float = TIME_LIMIT) -> str:
    """Evaluate an arithmetic expression: "23 + 58" -> "81". Integers print as integers (also a
    float result that is a whole number, e.g. "6 / 3" -> "2"); other floats with 12 significant
    digits. Anything else comes back as "error: ..."."""
    if not isinstance(expression, str):
        return "error: the expression must be a string"
    if len(expression) > MAX_EXPRESSION:
        return f"error: expression longer than {MAX_EXPRESSION} characters"
    try:
        with warnings.catch_warnings():  # "3a" warns (invalid decimal literal) before it fails: keep logs clean
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "error: not an arithmetic expression"
    try:
        value = _eval(tree.body, time.monotonic() + time_limit, time_limit)
    except CalcError as e:
        return f"error: {e}"
    except ZeroDivisionError:
        return "error: division by zero"
    except (OverflowError, MemoryError):
        return "error: result too large"
    except RecursionError:
        return "error: expression nested too deeply"
    return _format(value)


def _eval(node, deadline: float, limit: float):
    if time.monotonic() > deadline:
        raise CalcError(f"timed out after {limit:g}s")
    if isinstance(node, ast.Constant):
        if type(node.value) not in (int, float):  # bool, str, complex, None, ...
            raise CalcError(f"only numbers are allowed, not {node.value!r}")
        return _check(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand, deadline, limit))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        a, b = _eval(node.left, deadline, limit), _eval(node.right, deadline, limit)
        if isinstance(node.op, ast.Pow):
            _check_power(a, b)
        return _check(_BINARY[type(node.op)](a, b))
    what = type(node).__name__ if not isinstance(node, (ast.BinOp, ast.UnaryOp)) else type(node.op).__name__
    raise CalcError(f"{_NAMES.get(what, what)} is not allowed (arithmetic only: numbers, + - * / // % **, parentheses)")


_NAMES = {"Name": "a name", "Call": "a function call", "Attribute": "an attribute", "Subscript": "indexing",
          "Compare": "a comparison", "BitXor": "^ (use ** for powers)", "MatMult": "@"}


def _check_power(base, exp) -> None:
    """Refuse a power whose result would be huge before computing it."""
    if abs(exp) > MAX_EXPONENT:
        raise CalcError(f"exponent {exp} is too large (limit {MAX_EXPONENT})")
    if isinstance(base, int) and isinstance(exp, int) and exp > 0 and abs(base) > 1:
        if exp * math.log2(abs(base)) > MAX_INT_BITS:
            raise CalcError("result too large")


def _check(x):
    if isinstance(x, int) and x.bit_length() > MAX_INT_BITS:
        raise CalcError("result too large")
    if isinstance(x, float) and not math.isfinite(x):
        raise CalcError("result too large")
    if isinstance(x, complex):  # (-8) ** 0.5
        raise CalcError("the result is not a real number")
    return x


def _format(x) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    if isinstance(x, float):
        return format(x, ".12g")
    return str(x)


CALCULATOR = Tool(
    name="calculator", fn=calculator,
    description="Evaluate an arithmetic expression (numbers, + - * / // % **, parentheses).",
    parameters={"type": "object",
                "properties": {"expression": {"type": "string", "description": "e.g. \"23 * (4 + 5)\""}},
                "required": ["expression"]})

