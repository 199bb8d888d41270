"""The one rule for the names of runs and datasets (folder names under $WONDERLAND_HOME): the CLI,
the web app and the OpenAI API all check names here, so a name one accepts the others accept too."""

from __future__ import annotations

import re

from wonderland.errors import UserError

MAX_NAME = 100
_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_-]*\Z")  # \A...\Z: "run\n" does not pass as "$" would let it


def check_name(name: object, what: str = "run") -> str:
    """``name`` if it is a valid ``what`` name (letters, digits, '-' and '_', starting with a letter or
    digit, at most MAX_NAME characters); else a UserError saying which rule it breaks."""
    rule = f"use letters, digits, '-' and '_', starting with a letter or digit (max {MAX_NAME} characters)"
    if not isinstance(name, str) or not name:
        raise UserError(f"a {what} name is required: {rule}")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise UserError(f"invalid {what} name {name[:MAX_NAME]!r}: it contains a control character; {rule}")
    if len(name) > MAX_NAME:
        raise UserError(f"invalid {what} name {name[:20]!r}...: {len(name)} characters; {rule}")
    if not _NAME.match(name):
        raise UserError(f"invalid {what} name {name!r}: {rule}")
    return name
