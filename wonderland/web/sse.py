"""Server-sent events: framing, and the response wrapper that keeps proxies from buffering them."""

from __future__ import annotations

from typing import Any, Iterable

from flask import Response, stream_with_context

from wonderland.fileio import strict_dumps
from wonderland.web.common import ApiError

KEEPALIVE = ": keepalive\n\n"  # an SSE comment: ignored by clients, but it detects gone clients
KEEPALIVE_S = 15.0  # seconds of silence before a keepalive is sent


def frame(data: Any, event: str | None = None, id: int | str | None = None) -> str:
    """One SSE message. ``data`` is sent as one line of JSON, so it never needs splitting."""
    lines = []
    if id is not None:
        lines.append(f"id: {id}")
    if event:
        lines.append(f"event: {event}")
    lines.append("data: " + strict_dumps(data, separators=(",", ":"), ensure_ascii=False))
    return "\n".join(lines) + "\n\n"


def last_event_id(headers, args) -> int:
    """The seq the client already has: ``Last-Event-ID`` (sent by EventSource when it reconnects)
    or ``?after=N``; -1 = replay everything. A malformed value is a 400."""
    raw = headers.get("Last-Event-ID") or args.get("after")
    if raw is None or raw.strip() == "":
        return -1
    try:
        return int(raw)
    except ValueError:
        raise ApiError(400, f"Last-Event-ID / after must be an event id (an integer), got {raw[:40]!r}") from None


def response(chunks: Iterable[str]) -> Response:
    return Response(stream_with_context(chunks), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
