"""Server-sent events framing as OpenAI streams it: ``data: <json>\\n\\n`` ... ``data: [DONE]``."""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"
MEDIA_TYPE = "text/event-stream"
# Keep proxies (nginx) from buffering the stream.
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(data: dict[str, Any]) -> bytes:
    """One SSE event carrying ``data`` as compact JSON (one line: JSON escapes newlines)."""
    return (
        b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
    )


def parse(body: bytes) -> list[dict[str, Any] | str]:
    """Inverse of the framing (for tests and the benchmark): JSON payloads, and "[DONE]"."""
    out: list[dict[str, Any] | str] = []
    for block in body.decode().split("\n\n"):
        if not block.strip():
            continue
        if not block.startswith("data: "):
            raise ValueError(f"not an SSE data event: {block!r}")
        payload = block[len("data: ") :]
        out.append("[DONE]" if payload == "[DONE]" else json.loads(payload))
    return out
