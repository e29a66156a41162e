"""The tool registry: a name -> a Python function plus its description in the OpenAI `tools`
format (a JSON schema of the arguments), which is what a server lists and what a chat passes
on. `registry.call(name, arguments)` never raises: whatever goes wrong (unknown tool, bad JSON,
wrong arguments, the tool failing) comes back as a result string "error: ...", which the model
reads in its `tool` turn like any other result.
"""

from __future__ import annotations

import json
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

    def with_tools(self, *tools: Tool) -> "ToolRegistry":
        """A copy with these tools added (each replacing any tool of its name)."""
        names = {t.name for t in tools}
        return ToolRegistry([t for n, t in self._tools.items() if n not in names] + list(tools))

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
