"""Tools the model may call: leaves that the chat, the engine, evaluation and RL call.

  registry.py    Tool, ToolRegistry: name -> function + OpenAI `tools` spec; `call` never raises
  calculator.py  arithmetic by walking an `ast` (no eval), bounded work and time
  python.py      runs model-written Python in an OS sandbox (namespaces, rlimits, a wall-clock kill)
  search.py      retrieval over a folder of files (SQLite FTS5, BM25): SearchIndex, search_tool(index)
                 (not in the default registry: it needs an index of the user's folder)
"""

from lmstack.tools.calculator import CALCULATOR
from lmstack.tools.python import PYTHON
from lmstack.tools.registry import Tool, ToolRegistry

__all__ = ["Tool", "ToolRegistry", "default_registry"]


def default_registry() -> ToolRegistry:
    """The tools `lmstack chat` offers: the calculator and python (sandboxed)."""
    return ToolRegistry([CALCULATOR, PYTHON])
