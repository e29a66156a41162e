"""The security commands of `lmstack`: `redteam` (attack a model, with or without defences) and
`poison` (make a poisoned training set). Their arguments (`add_parsers`, called by
lmstack/cli.py's command map) and their thin handlers live together here.
"""

from __future__ import annotations


def add_parsers(sub, parser_class) -> None:
    """The security subcommands, on the command map `sub`."""
