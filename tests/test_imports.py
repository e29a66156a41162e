"""The house rule: imports point down the layers of lmstack (README, "The map of the code"),
and no module imports itself back through others (no cycle), counting imports inside functions.

Read from the source with `ast`, so the test sees every import a module could ever run.
"""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lmstack"

# Top to bottom. A module may import from its own layer's package (lmstack.eval.run from
# lmstack.eval.lm), from a lower layer, and, in the bottom layer only, from a sibling.
LAYERS = [
    ["lmstack.__main__"],
    ["lmstack.cli"],
    ["lmstack.cli_align", "lmstack.cli_research", "lmstack.cli_security"],
    ["lmstack.security"],
    ["lmstack.experiments"],
    ["lmstack.speedrun"],
    ["lmstack.think"],
    ["lmstack.align", "lmstack.scaling"],
    ["lmstack.train", "lmstack.eval", "lmstack.serve", "lmstack.export"],
    ["lmstack.chat"],
    ["lmstack.assistant"],
    ["lmstack.engine"],
    ["lmstack.modelio", "lmstack.distributed"],
    ["lmstack.model", "lmstack.device", "lmstack.quant"],
    ["lmstack.tokenizer", "lmstack.chatformat", "lmstack.data", "lmstack.sources", "lmstack.config",
     "lmstack.world", "lmstack.stats", "lmstack.tools", "lmstack.toolloop", "lmstack.utils", "lmstack"],
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
            # "lmstack" places the package itself, not everything in it (or every module would have a layer)
            inside = mod.startswith(p + ".") and p != "lmstack"
            if (mod == p or inside) and (best is None or len(p) > len(best[1])):
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


def test_training_sits_above_everything_that_runs_a_model():
    """Nothing that runs, evaluates, serves or exports a model may import train/ or align/: with
    test_imports_point_down, that holds as long as LAYERS puts training above engine, chat and
    modelio, and above or beside (never below, never among the leaves) eval, serve and export."""
    bottom = len(LAYERS) - 1
    for t in ("lmstack.train", "lmstack.align"):
        (i, _) = layer(t)
        for u in ("lmstack.engine", "lmstack.chat", "lmstack.modelio"):
            assert i < layer(u)[0], f"{t} is not above {u} in LAYERS"
        for u in ("lmstack.eval", "lmstack.serve", "lmstack.export"):
            assert i <= layer(u)[0] and i != bottom, f"{t} is below {u} (or among the leaves) in LAYERS"


README = PACKAGE.parent / "README.md"
def map_of_the_code() -> set[str]:
    """What the README's map names inside lmstack/: the first word of each entry line, where an entry
    is indented two spaces per level and names a .py or .toml file or a folder/ (its description may
    run on to more lines, indented further). Paths relative to lmstack/, folders ending in "/"."""
    text = README.read_text(encoding="utf-8").split("## The map of the code", 1)[1]
    block = text.split("```", 2)[1].splitlines()
    start = block.index("lmstack/")
    named, folders = set(), []
    for line in block[start + 1:]:
        if line and not line.startswith(" "):
            break  # the next top-level entry (bench/, tests/): lmstack/ is over
        m = re.match(r"( +)(\S+(?:\.py|\.toml|/))(?:\s|$)", line)
        if not m or len(m[1]) % 2 or len(m[1]) // 2 > len(folders) + 1:
            continue  # a description's next line
        depth = len(m[1]) // 2 - 1
        folders = folders[:depth]
        path = "".join(folders) + m[2]
        named.add(path)
        if path.endswith("/"):
            folders.append(m[2])
    return named


def tree_of_the_code(named: set[str]) -> set[str]:
    """The .py and .toml files and the folders in lmstack/ (not __init__.py, not __pycache__/); a
    folder the map names without naming anything in it stands for all of its content."""
    whole = {f for f in named if f.endswith("/") and not any(n != f and n.startswith(f) for n in named)}
    found = set()
    for p in PACKAGE.rglob("*"):
        rel = p.relative_to(PACKAGE).as_posix() + ("/" if p.is_dir() else "")
        if "__pycache__" in p.parts or p.name == "__init__.py" or not (p.is_dir() or p.suffix in (".py", ".toml")):
            continue
        if not any(rel != w and rel.startswith(w) for w in whole):
            found.add(rel)
    return found


def test_the_readme_map_names_every_module():
    named = map_of_the_code()
    tree = tree_of_the_code(named)
    assert len(named) > 40, "the README's map was not found or not parsed"
    missing = tree - named
    gone = named - tree
    assert not missing, f"in lmstack/ but not in the README's map: {sorted(missing)}"
    assert not gone, f"in the README's map but not in lmstack/: {sorted(gone)}"


def test_the_command_line_parser_imports_no_torch():
    """`lmstack --help`, `lmstack world` and other commands that run no model start without torch
    (about 2 s of imports): the parser's choices and defaults come from torch-free modules."""
    import subprocess
    import sys

    code = ("import sys\nfrom lmstack.cli import build_parser\nbuild_parser()\n"
            "print(sorted(m for m in ('torch', 'lm_eval', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
