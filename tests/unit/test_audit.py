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
        "prev": audit.GENESIS,
    }
    entries = audit.tail(executor, state, 5)
    assert [e["outcome"] for e in entries] == ["ok", "rolled-back"]
    assert audit.tail(executor, state, 1)[0]["error"] == "health timed out"
    # Appending runs the chaining script under sudo, the line on stdin, the path in argv.
    appends = [c for c in executor.calls if c.argv[:2] == ("python3", "-c")]
    assert appends[0].argv[-1] == f"{state}/audit.log" and appends[0].sudo
    assert json.loads(appends[0].stdin or "") == {k: v for k, v in first.items() if k != "prev"}


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


def test_the_chain_holds_and_finds_any_change(tmp_path: Path) -> None:
    executor = LocalExecutor()
    state = str(tmp_path)
    for i in range(4):
        audit.append(executor, state, entry(outcome=f"run-{i}"))
    assert audit.verify(executor, state).describe() == "audit chain holds: 4 entries"
    log = tmp_path / "audit.log"
    lines = log.read_text().splitlines(keepends=True)

    edited = lines[1].replace("run-1", "run-X")
    log.write_text("".join([lines[0], edited, *lines[2:]]))
    report = audit.verify(executor, state)
    assert not report.holds and report.broken_at == 3  # the line after the edit no longer follows

    log.write_text("".join([lines[0], *lines[2:]]))  # a line removed
    assert audit.verify(executor, state).broken_at == 2

    forged = json.loads(lines[1])
    log.write_text("".join([lines[0], json.dumps(forged) + "\n", *lines[1:]]))  # one inserted
    assert not audit.verify(executor, state).holds


def test_older_unchained_entries_are_counted_not_failed(tmp_path: Path) -> None:
    (tmp_path / "audit.log").write_text('{"command": "old", "outcome": "ok"}\n')
    executor = LocalExecutor()
    audit.append(executor, str(tmp_path), entry())
    report = audit.verify(executor, str(tmp_path))
    assert report.holds and (report.entries, report.legacy) == (1, 1)
    assert audit.verify(executor, str(tmp_path / "none")).holds  # no log yet


def test_concurrent_appends_keep_one_chain(tmp_path: Path) -> None:
    executor = LocalExecutor()
    threads = [
        threading.Thread(target=audit.append, args=(executor, str(tmp_path), entry(outcome=str(i))))
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = audit.verify(executor, str(tmp_path))
    assert report.holds and report.entries == 8


def test_entries_name_the_ssh_key(tmp_path: Path) -> None:
    class KeyedExecutor(LocalExecutor):
        key_fingerprint = "SHA256:abc"

    audit.append(KeyedExecutor(), str(tmp_path), entry())
    assert json.loads((tmp_path / "audit.log").read_text())["key"] == "SHA256:abc"
