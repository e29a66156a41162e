"""Tools the model may call, and the calculator.

A `ToolRegistry` maps a name to a Python function plus its description in the OpenAI `tools`
format (a JSON schema of the arguments), which is what a server lists and what a chat passes
on. `registry.call(name, arguments)` never raises: whatever goes wrong (unknown tool, bad JSON,
wrong arguments, the tool failing) comes back as a result string "error: ...", which the model
reads in its `tool` turn like any other result.

The calculator evaluates arithmetic only. It parses with `ast` and walks the tree itself:
numbers, + - * / // % **, unary minus/plus and parentheses; names, calls, attributes,
subscripts and everything else are refused (there is no `eval`). Its work is bounded up front
(expression length, exponent size, integer size), and a deadline is checked at every node, so
a call returns within its time limit without needing a thread or process to kill.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import time
import warnings
from dataclasses import dataclass
from typing import Callable


@dataclass
class Tool:
    name: str
    fn: Callable[..., object]
    description: str
    parameters: dict  # JSON schema of the keyword arguments

    def spec(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


class ToolRegistry:
    def __init__(self, tools: list[Tool] = ()):
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.register(t.name, t.fn, t.description, t.parameters)

    def register(self, name: str, fn: Callable[..., object], description: str, parameters: dict) -> None:
        self._tools[name] = Tool(name, fn, description, parameters)

    def __contains__(self, name: str) -> bool:
        return name in self._tools

    def names(self) -> list[str]:
        return list(self._tools)

    def subset(self, names) -> "ToolRegistry":
        """A registry with only the named tools (a call to any other gets an "error: ..." result)."""
        return ToolRegistry([self._tools[n] for n in names if n in self._tools])

    def specs(self) -> list[dict]:
        """The OpenAI `tools` list: [{"type": "function", "function": {name, description, parameters}}]."""
        return [t.spec() for t in self._tools.values()]

    def call(self, name: str, arguments: str | dict | None) -> str:
        """Run a tool; the result as a string. Never raises: failures are "error: ..." results."""
        try:
            return self._call(name, arguments)
        except Exception as e:  # noqa: BLE001 - whatever a call holds (JSON nested past the parser), a result
            return f"error: {type(e).__name__}: {e}"

    def _call(self, name, arguments) -> str:
        tool = self._tools.get(name)
        if tool is None:
            return f"error: unknown tool {name!r} (available: {', '.join(self._tools) or 'none'})"
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except (ValueError, RecursionError):
                return f"error: the arguments of {name} are not valid JSON"
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            return f"error: the arguments of {name} must be a JSON object"
        required = tool.parameters.get("required", [])
        known = tool.parameters.get("properties", {})
        missing = [k for k in required if k not in arguments]
        unknown = [k for k in arguments if known and k not in known]
        if missing or unknown:
            return f"error: {name} takes {', '.join(known) or 'no arguments'}" + (
                f" (missing: {', '.join(missing)})" if missing else f" (unknown: {', '.join(unknown)})")
        try:
            result = tool.fn(**arguments)
        except Exception as e:  # a tool's failure is a result the model can read, not a crash
            return f"error: {type(e).__name__}: {e}"
        return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)


# --- the calculator ---------------------------------------------------------------------------

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


def default_registry() -> ToolRegistry:
    """The tools `lmstack chat` offers: the calculator."""
    return ToolRegistry([CALCULATOR])
