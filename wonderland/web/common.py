"""Small helpers shared by the API blueprints: errors with an HTTP status, JSON bodies, run lookup."""

from __future__ import annotations

from typing import Any

from flask import request
from flask.json.provider import DefaultJSONProvider

from wonderland.errors import UserError
from wonderland.fileio import json_safe
from wonderland.names import check_name
from wonderland.runs import RunDir, runs_root


class StrictJSONProvider(DefaultJSONProvider):
    """Flask's JSON with non-finite numbers as null: every answer is valid JSON (a NaN loss stored by
    an old run would otherwise reach the browser as a bare ``NaN`` and fail the whole page's parse)."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return super().dumps(json_safe(obj), allow_nan=False, **kwargs)


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def json_body() -> dict[str, Any]:
    """The request's JSON object; a 400 for anything else."""
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise ApiError(400, "expected a JSON object body (Content-Type: application/json)")
    return data


def valid_name(name: str, what: str = "run") -> str:
    """``name`` checked by the one rule for run and dataset names; a 400 naming the rule otherwise."""
    try:
        return check_name(name, what)
    except UserError as e:
        raise ApiError(400, str(e)) from None


def run_dir(name: str, must_exist: bool = True) -> RunDir:
    """The run called ``name`` under runs_root() (names only: never a path from a client)."""
    run = RunDir(runs_root() / valid_name(name))
    if must_exist and not run.exists():
        raise ApiError(404, f"no run named {name!r}")
    return run
