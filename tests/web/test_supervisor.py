"""`manage.py up`'s supervisor with real child processes (fast: pauses shortened)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dailweb.management.commands.up import (
    SupervisionError,
    Supervisor,
    exit_reason,
    restart_delay,
)


def spawner(code: str):
    return lambda: subprocess.Popen([sys.executable, "-c", code])


def run_checks(supervisor: Supervisor, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        supervisor.check()
        time.sleep(0.02)


def test_restart_pauses_grow_and_are_capped():
    assert [restart_delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_exit_reasons_name_the_code_or_the_signal():
    assert exit_reason(3) == "exit code 3"
    assert exit_reason(-signal.SIGKILL) == "killed by SIGKILL"


def test_a_killed_child_is_reaped_reported_and_restarted(tmp_path):
    lines: list[str] = []
    supervisor = Supervisor(lines.append, max_delay=0.05)
    supervisor.start("sleeper", tmp_path / "sleeper.log", spawner("import time; time.sleep(60)"))
    first = supervisor.children["sleeper"].process
    first.send_signal(signal.SIGKILL)
    run_checks(supervisor, 1.0)
    try:
        assert first.returncode == -signal.SIGKILL  # reaped: no zombie left
        assert not Path(f"/proc/{first.pid}").exists()
        assert supervisor.alive("sleeper")
        assert supervisor.children["sleeper"].process.pid != first.pid
        assert any(
            f"sleeper (pid {first.pid}) stopped unexpectedly (killed by SIGKILL)" in line
            for line in lines
        )
        assert any(line.startswith("sleeper: restarted (pid ") for line in lines)
    finally:
        supervisor.stop_all()
    assert not supervisor.children["sleeper"].process


def test_a_child_that_keeps_failing_stops_everything_naming_its_log(tmp_path):
    lines: list[str] = []
    supervisor = Supervisor(lines.append, max_delay=0.05)
    supervisor.start("steady", tmp_path / "steady.log", spawner("import time; time.sleep(60)"))
    supervisor.start("broken", tmp_path / "broken.log", spawner("raise SystemExit(3)"))
    steady = supervisor.children["steady"].process
    try:
        with pytest.raises(SupervisionError) as failure:
            run_checks(supervisor, 10.0)
    finally:
        supervisor.stop_all()
    message = str(failure.value)
    assert "(exit code 3) 5 times within 60 s; stopping everything" in message
    assert f"Read {tmp_path / 'broken.log'}" in message
    assert sum("restarting in" in line for line in lines) == 4
    assert steady.returncode == -signal.SIGTERM  # the healthy one was stopped too
