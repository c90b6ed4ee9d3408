"""The host's audit log, against a real filesystem through a local executor."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from deployer import audit
from deployer.redact import REDACTED, Secret
from tests.local_executor import LocalExecutor

KEY = "sk-live-0123456789abcdefXYZ"


def entry(**kw: object) -> audit.AuditEntry:
    base: dict[str, object] = {
        "command": "deploy-model qwen3-14b",
        "outcome": "ok",
        "model": "qwen3-14b",
        "plan": {"mode": "coexist", "port": 8001, "quantization": "4bit"},
        "duration_s": 12.3456,
        "operator": "alice@laptop",
        "time": "2026-01-02T03:04:05+00:00",
    }
    base.update(kw)
    return audit.AuditEntry(**base)  # type: ignore[arg-type]


def test_append_and_tail(tmp_path: Path) -> None:
    executor = LocalExecutor()
    state = str(tmp_path / "state")
    assert audit.tail(executor, state) == []  # no log yet
    audit.append(executor, state, entry())
    audit.append(executor, state, entry(outcome="rolled-back", error="health timed out"))
    lines = (tmp_path / "state" / "audit.log").read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first == {
        "command": "deploy-model qwen3-14b",
        "outcome": "ok",
        "model": "qwen3-14b",
        "plan": {"mode": "coexist", "port": 8001, "quantization": "4bit"},
        "duration_s": 12.35,
        "operator": "alice@laptop",
        "time": "2026-01-02T03:04:05+00:00",
    }
    entries = audit.tail(executor, state, 5)
    assert [e["outcome"] for e in entries] == ["ok", "rolled-back"]
    assert audit.tail(executor, state, 1)[0]["error"] == "health timed out"
    # Appending is `tee -a` with the line on stdin, under sudo.
    appends = [c for c in executor.calls if c.argv[0] == "tee"]
    assert appends[0].argv == ("tee", "-a", "--", f"{state}/audit.log") and appends[0].sudo
    assert appends[0].stdin == lines[0] + "\n"


def test_secrets_never_reach_the_log(tmp_path: Path) -> None:
    executor = LocalExecutor()
    state = str(tmp_path)
    audit.append(
        executor,
        state,
        entry(
            plan={"port": 8001, "api_key": KEY, "env": {"ASOBA_API_KEY": Secret(KEY)}},
            error=f"server said: bad key {KEY}",
            details={"aws": "AKIAABCDEFGHIJKLMNOP", "password": "hunter2"},
        ),
        secrets=[Secret(KEY)],
    )
    text = (tmp_path / "audit.log").read_text()
    for leaked in (KEY, "AKIAABCDEFGHIJKLMNOP", "hunter2"):
        assert leaked not in text
    record = json.loads(text)
    assert record["plan"]["port"] == 8001 and record["plan"]["api_key"] == REDACTED
    for call in executor.calls:
        assert KEY not in call.command and (call.stdin is None or KEY not in call.stdin)


def test_tail_skips_damaged_lines(tmp_path: Path) -> None:
    executor = LocalExecutor()
    audit.append(executor, str(tmp_path), entry(outcome="a"))
    with (tmp_path / "audit.log").open("a") as fh:
        fh.write('{"half": \n')
    audit.append(executor, str(tmp_path), entry(outcome="b"))
    assert [e["outcome"] for e in audit.tail(executor, str(tmp_path), 10)] == ["a", "b"]
    assert audit.tail(executor, str(tmp_path), 0) == []


def test_concurrent_appends_do_not_interleave(tmp_path: Path) -> None:
    executor = LocalExecutor()

    def write(i: int) -> None:
        audit.append(executor, str(tmp_path), entry(outcome=f"run-{i}", details={"pad": "x" * 900}))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = (tmp_path / "audit.log").read_text().splitlines()
    assert sorted(json.loads(line)["outcome"] for line in lines) == sorted(
        f"run-{i}" for i in range(12)
    )


def test_long_plans_are_shortened() -> None:
    line = audit.render_line(entry(plan={"steps": ["x" * 100] * 200}))
    assert len(line) <= audit.MAX_LINE + 1
    assert json.loads(line)["plan"].endswith("...")
