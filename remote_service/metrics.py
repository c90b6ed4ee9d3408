"""Prometheus metrics, named after vLLM's (``vllm:`` becomes ``asoba:``) so the same dashboards
and alerts apply. Each app has its own registry; the engine reports through :class:`Metrics`,
which implements :class:`~remote_service.engine.base.EngineObserver` (thread-safe)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from remote_service.engine.base import EngineStats

PREFIX = "asoba:"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5)
_REQUEST_BUCKETS = (0.05, 0.1, 0.3, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, m = self.registry, model_name
        labels = ["model_name"]
        self._running = Gauge(
            PREFIX + "num_requests_running", "Sequences in the running batch", labels, registry=r
        )
        self._waiting = Gauge(
            PREFIX + "num_requests_waiting", "Requests waiting for a slot", labels, registry=r
        )
        self._success = Counter(
            PREFIX + "request_success",
            "Finished requests by finish reason",
            [*labels, "finished_reason"],
            registry=r,
        )
        self._prompt = Counter(
            PREFIX + "prompt_tokens", "Prefilled prompt tokens", labels, registry=r
        ).labels(m)
        self._generation = Counter(
            PREFIX + "generation_tokens", "Generated tokens", labels, registry=r
        ).labels(m)
        self._ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Arrival to first token",
            labels,
            buckets=(*_LATENCY_BUCKETS, 5.0, 10.0, 30.0),
            registry=r,
        ).labels(m)
        self._itl = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Time between two tokens of a sequence",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        ).labels(m)
        self._e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Arrival to last token",
            labels,
            buckets=_REQUEST_BUCKETS,
            registry=r,
        ).labels(m)
        self._queue = Histogram(
            PREFIX + "request_queue_time_seconds",
            "Time waiting for a slot",
            labels,
            buckets=_REQUEST_BUCKETS,
            registry=r,
        ).labels(m)
        self._http = Counter(
            PREFIX + "http_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=r,
        )
        self._http_time = Histogram(
            PREFIX + "http_request_duration_seconds",
            "HTTP request duration (streams: until the last byte)",
            ["route"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.model_load = Gauge(
            PREFIX + "model_load_seconds", "Time to load the weights", labels, registry=r
        ).labels(m)
        self.ready = Gauge(
            PREFIX + "engine_ready", "1 once the model serves", labels, registry=r
        ).labels(m)
        self._model_name = m

    def track_engine(self, stats: Callable[[], EngineStats]) -> None:
        """Read queue depth and batch size from the engine at scrape time."""
        self._running.labels(self._model_name).set_function(lambda: stats().running)
        self._waiting.labels(self._model_name).set_function(lambda: stats().waiting)

    # EngineObserver ---------------------------------------------------------------------------

    def first_token(self, ttft_s: float) -> None:
        self._ttft.observe(ttft_s)
        self._generation.inc()

    def inter_token(self, seconds: float) -> None:
        self._itl.observe(seconds)
        self._generation.inc()

    def finished(
        self, reason: str, prompt_tokens: int, completion_tokens: int, e2e_s: float, queue_s: float
    ) -> None:
        self._success.labels(self._model_name, reason).inc()
        self._prompt.inc(prompt_tokens)
        self._e2e.observe(e2e_s)
        self._queue.observe(queue_s)

    # HTTP -------------------------------------------------------------------------------------

    def http_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self._http.labels(method, route, str(status)).inc()
        self._http_time.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


# A child's client-library defaults: the same families as ours, describing another process.
_CHILD_DEFAULT_FAMILIES = ("python_", "process_", "platform_")
_SAMPLE_SUFFIXES = ("_total", "_created", "_bucket", "_count", "_sum", "_info")


def _family_of(line: str) -> str | None:
    """The metric name a text-format line is about (None for blank lines and comments
    other than HELP/TYPE)."""
    if line.startswith("#"):
        parts = line.split(None, 3)
        return parts[2] if len(parts) >= 3 and parts[1] in ("HELP", "TYPE") else None
    name = line.split("{", 1)[0].split(None, 1)[0] if line.strip() else ""
    return name or None


def merge_exposition(ours: bytes, theirs: bytes) -> bytes:
    """Our text exposition followed by a child's, less the child's families whose names are
    ours too or are its client library's process/python/platform defaults (a scrape with a
    family twice is rejected by Prometheus)."""
    if not theirs.strip():
        return ours
    taken: set[str] = set()
    for line in ours.decode("utf-8", "replace").splitlines():
        name = _family_of(line)
        if name:
            taken.add(name)
    kept = []
    for line in theirs.decode("utf-8", "replace").splitlines():
        name = _family_of(line)
        if name is None:
            if line.startswith("#") and line.strip() != "# EOF":
                kept.append(line)
            continue
        base = name
        for suffix in _SAMPLE_SUFFIXES:
            if base.endswith(suffix):
                base = base[: -len(suffix)]
                break
        if name.startswith(_CHILD_DEFAULT_FAMILIES) or name in taken or base in taken:
            continue
        kept.append(line)
    if not kept:
        return ours
    return ours.rstrip(b"\n") + b"\n" + "\n".join(kept).encode() + b"\n"
