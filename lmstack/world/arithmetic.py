"""Arithmetic by number of digits: plain answers, step-by-step scratchpads, word problems.

"Digits" is the number of digits of each operand. Problems chosen for evaluation are passed
in as `exclude` so no training text ever contains them.
"""

from __future__ import annotations

import json
import math
import random

OPS = ("+", "-", "*")
MAX_DIGITS = {"+": 5, "-": 5, "*": 3}
PLACES = ["Ones", "Tens", "Hundreds", "Thousands", "Ten-thousands", "Hundred-thousands"]
THINGS = ["apples", "books", "coins", "stamps", "tickets", "marbles", "pencils", "shells",
          "bottles", "letters"]


def operand(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def sample_problem(rng: random.Random, op: str, digits: int, exclude=frozenset()) -> tuple[int, str, int]:
    for _ in range(100):
        a, b = operand(rng, digits), operand(rng, digits)
        if op == "-" and a < b:
            a, b = b, a  # keep results non-negative
        if (a, op, b) not in exclude:
            return a, op, b
    return a, op, b  # tiny problem spaces (1 digit) may be exhausted by the exclusions


def compute(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def expression(a: int, op: str, b: int) -> str:
    return f"{a} {op} {b}"


def plain(a: int, op: str, b: int) -> str:
    return f"{expression(a, op, b)} = {compute(a, op, b)}"


def _digits(n: int, width: int) -> list[int]:
    return [int(c) for c in str(n).zfill(width)][::-1]  # ones first


def scratchpad(a: int, op: str, b: int) -> str:
    """A worksheet's worked problem: the question, then `worked` steps."""
    return f"Question: What is {expression(a, op, b)}?\n" + worked(a, op, b)


def worked(a: int, op: str, b: int) -> str:
    """A worked solution, column by column (or by partial products for *), ending in
    "Answer: a op b = c": the scratchpad an assistant writes when asked to think step by step."""
    lines = []
    if op == "*":
        partials = []
        for i, d in enumerate(_digits(b, len(str(b)))):
            p = a * d * 10 ** i
            partials.append(p)
            lines.append(f"{a} * {d * 10 ** i} = {p}.")
        total = partials[0]
        for p in partials[1:]:
            lines.append(f"Add: {total} + {p} = {total + p}.")
            total += p
    else:
        width = max(len(str(a)), len(str(b)))
        da, db = _digits(a, width), _digits(b, width)
        lines.append("Work digit by digit, from the right.")
        carry = 0
        for i in range(width):
            place = PLACES[i]
            if op == "+":
                s = da[i] + db[i] + carry
                extra = f" + {carry}" if carry else ""
                carry, digit = divmod(s, 10)
                tail = f" Write {digit}, carry {carry}." if carry else f" Write {digit}."
                lines.append(f"{place}: {da[i]} + {db[i]}{extra} = {s}.{tail}")
            else:
                top = da[i] - carry
                top_s = f"{da[i]} - {carry}" if carry else f"{da[i]}"
                if top >= db[i]:
                    carry = 0
                    lines.append(f"{place}: {top_s} - {db[i]} = {top - db[i]}. Write {top - db[i]}.")
                else:
                    carry = 1
                    lines.append(f"{place}: {top_s} is less than {db[i]}, so borrow: "
                                 f"{top + 10} - {db[i]} = {top + 10 - db[i]}. Write {top + 10 - db[i]}, borrow 1.")
        if op == "+" and carry:
            lines.append(f"Write the last carry: {carry}.")
    lines.append(f"Answer: {plain(a, op, b)}")
    return "\n".join(lines)


def word_problem(rng: random.Random, a: int, op: str, b: int, name: str, gender: str) -> tuple[str, str]:
    """(question, worked answer) in words."""
    thing = rng.choice(THINGS)
    pron = "she" if gender == "female" else "he"
    c = compute(a, op, b)
    if op == "+":
        q = f"{name} has {a} {thing}. Then {pron} gets {b} more. How many {thing} does {pron} have now?"
        s = f"{name} has {a} + {b} = {c} {thing}."
    elif op == "-":
        q = f"{name} has {a} {thing} and gives {b} of them away. How many {thing} are left?"
        s = f"{a} - {b} = {c}, so {c} {thing} are left."
    else:
        q = f"{name} buys {a} boxes with {b} {thing} in each box. How many {thing} is that in total?"
        s = f"{a} * {b} = {c}, so that is {c} {thing}."
    return q, s


def random_op_digits(rng: random.Random) -> tuple[str, int]:
    op = rng.choice(["+", "+", "-", "*"])
    return op, rng.randint(1, MAX_DIGITS[op])


def document(rng: random.Random, names: list[tuple[str, str]], exclude) -> str:
    """One arithmetic document: a worksheet of plain answers, a scratchpad, or a word problem."""
    kind = rng.random()
    op, digits = random_op_digits(rng)
    if kind < 0.4:
        title = {"+": "addition", "-": "subtraction", "*": "multiplication"}[op]
        rows = [plain(*sample_problem(rng, op, digits, exclude)) for _ in range(rng.randint(4, 10))]
        return f"Practice sheet: {digits}-digit {title}.\n" + "\n".join(rows)
    a, op, b = sample_problem(rng, op, digits, exclude)
    if kind < 0.75:
        return scratchpad(a, op, b)
    name, gender = rng.choice(names)
    q, s = word_problem(rng, a, op, b, name, gender)
    return f"Problem: {q}\nSolution: {s}\nAnswer: {compute(a, op, b)}"


# ---- tool calls (the calculator's and python's argument formats), shared with the assistant data ----

def tool_call(name: str, arguments: dict, call_id: str) -> dict:
    """An OpenAI-style tool call (arguments are a JSON string)."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def calculator_call(expr: str, call_id: str) -> dict:
    return tool_call("calculator", {"expression": expr}, call_id)


def python_call(code: str, call_id: str) -> dict:
    return tool_call("python", {"code": code}, call_id)


def python_problem(rng: random.Random) -> tuple[str, str, int, str]:
    """A problem beyond the calculator, for the python tool: (question, code, value, answer)."""
    k = rng.randrange(3)
    if k == 0:
        a = rng.randint(1, 500)
        b = a + rng.randint(10, 5000)
        v = (a + b) * (b - a + 1) // 2
        return (f"What is the sum of the whole numbers from {a} to {b}?", f"print(sum(range({a}, {b} + 1)))", v,
                f"The sum of the whole numbers from {a} to {b} is {v}.")
    if k == 1:
        n, d = rng.randint(100, 100_000), rng.randint(2, 99)
        return (f"How many whole numbers from 1 to {n} are divisible by {d}?",
                f"print(sum(1 for x in range(1, {n} + 1) if x % {d} == 0))", n // d,
                f"{n // d} of the whole numbers from 1 to {n} are divisible by {d}.")
    a = rng.randint(2, 25)
    v = math.factorial(a)
    return f"What is {a} factorial?", f"import math\nprint(math.factorial({a}))", v, f"{a} factorial is {v}."
