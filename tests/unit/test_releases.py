"""Release records on the host, against a real filesystem through a local executor."""

from __future__ import annotations

import getpass
import stat
from pathlib import Path

from deployer.releases import Release, Releases
from tests.fakes import make_release
from tests.local_executor import LocalExecutor


def release(model: str, port: int = 8001) -> Release:
    return make_release(model, port=port)


def test_record_current_previous_and_prune(tmp_path: Path) -> None:
    env = tmp_path / "service.env"
    env.write_text("ASOBA_API_KEY=k\n")
    env.chmod(0o600)
    store = Releases(LocalExecutor(), str(tmp_path / "state"))
    assert store.current() is None and store.previous() is None and store.numbers() == []

    first = store.record(release("a"), env_source=str(env), operator=f"{getpass.getuser()}@x")
    assert first.number == 1 and store.current() == first
    saved_env = Path(first.env_file or "")
    assert saved_env.read_text() == "ASOBA_API_KEY=k\n"
    assert stat.S_IMODE(saved_env.stat().st_mode) == 0o600
    # The record the unprivileged probe reads: readable, and without the key (only its path).
    current = tmp_path / "state" / "current.json"
    assert stat.S_IMODE(current.stat().st_mode) == 0o644
    assert "ASOBA_API_KEY" not in current.read_text()

    store.record(release("b"), env_source=str(env))
    third = store.record(release("c", 8000), env_source=str(env), keep=2)
    assert store.numbers() == [2, 3]
    assert not (tmp_path / "state" / "releases" / "1.env").exists()
    assert store.current() == third
    previous = store.previous()
    assert previous is not None and previous.model == "b" and previous.number == 2
    assert store.model_paths_in_use() == {"/opt/models/b/r1", "/opt/models/c/r1"}
    assert "c@r1 on port 8000" in third.summary()

    store.set_current(previous)  # a rollback makes the previous release current again
    assert store.current() == previous and store.previous() is None
