"""The house rule: imports point down the layers of lmstack (README, "The map of the code"),
and no module imports itself back through others (no cycle), counting imports inside functions.

Read from the source with `ast`, so the test sees every import a module could ever run.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lmstack"

# Top to bottom. A module may import from its own layer's package (lmstack.eval.run from
# lmstack.eval.lm), from a lower layer, and, in the bottom layer only, from a sibling.
LAYERS = [
    ["lmstack.__main__"],
    ["lmstack.cli"],
    ["lmstack.speedrun"],
    ["lmstack.align"],
    ["lmstack.train", "lmstack.eval", "lmstack.serve", "lmstack.export"],
    ["lmstack.chat"],
    ["lmstack.engine"],
    ["lmstack.modelio", "lmstack.distributed"],
    ["lmstack.model", "lmstack.device"],
    ["lmstack.tokenizer", "lmstack.chatformat", "lmstack.data", "lmstack.sources", "lmstack.config",
     "lmstack.world", "lmstack.stats", "lmstack.tools", "lmstack.utils", "lmstack"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The lmstack modules a file imports (a name imported from a package counts as its
    submodule when there is one: `from lmstack.train import loop` is lmstack.train.loop)."""
    found = set()
    this = module_name(path)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "lmstack"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x
                base = this.split(".")[:len(this.split(".")) - node.level + (path.name == "__init__.py")]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "lmstack":
                continue
            for a in node.names:
                found.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod)
    found.discard(this)
    return found


def layer(mod: str) -> tuple[int, str]:
    """(layer index, the prefix that placed it there): the longest matching prefix wins."""
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (i, p)
    assert best is not None, f"{mod} is in no layer: add it to LAYERS (and to the README's map)"
    return best


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods)) for m, p in mods.items()}


def test_every_module_has_a_layer():
    for m in modules():
        layer(m)


def test_imports_point_down():
    bottom = len(LAYERS) - 1
    bad = []
    for mod, deps in graph().items():
        (i, home) = layer(mod)
        for dep in deps:
            (j, other) = layer(dep)
            if j < i or (j == i and other != home and i != bottom):
                bad.append(f"{mod} imports {dep} ({other} is {'above' if j < i else 'beside'} {home})")
    assert not bad, "imports that point up or sideways:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    g = graph()
    cycles, state = [], {}

    def visit(m, path):
        state[m] = "open"
        for d in sorted(g.get(m, ())):
            if state.get(d) == "open":
                cycles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_inference_eval_serve_and_export_never_import_training():
    training = ("lmstack.train", "lmstack.align")
    users = ("lmstack.engine", "lmstack.chat", "lmstack.modelio", "lmstack.eval", "lmstack.serve", "lmstack.export")
    bad = [f"{m} imports {d}" for m, deps in graph().items() if m.startswith(users)
           for d in deps if d.startswith(training)]
    assert not bad, "\n".join(bad)
