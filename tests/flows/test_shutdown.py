"""`nightrec ui` and `nightrec serve` started as a user starts them, then stopped with SIGTERM (what `kill`, systemd or
a container runtime sends) and SIGINT (Ctrl-C): within seconds, nothing they started is left running or listening, and
no "coroutine ... was never awaited"."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.flows.processes import nightrec_command
from tests.flows.test_deployments import free_port

pytestmark = pytest.mark.slow


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc: each process's parent)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start_and_stop(
    args: list[str], port: int, sig: int, log: Path, ready: str = "", ready_s: float = 120.0
) -> tuple[float, str]:
    """Start ``nightrec ARGS`` (for SIGINT, with SIGINT inherited as ignored), wait until ``port`` listens and the
    output shows ``ready``, send ``sig``; (seconds it took to exit, its output)."""
    with open(log, "w") as out:
        # SIGINT as a shell without job control leaves it for a background job (`nightrec ui &` in a script, CI):
        # ignored. The command must stop on `kill -INT` all the same, so the harder start is the one tested.
        ignore_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sig == signal.SIGINT else None
        proc = subprocess.Popen(
            [*nightrec_command(), *args], stdout=out, stderr=subprocess.STDOUT, preexec_fn=ignore_sigint
        )
    try:
        deadline = time.monotonic() + ready_s
        while not listening(port) or ready not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"port {port} never listened:\n{log.read_text()}"
            time.sleep(0.5)
        time.sleep(3)  # settled: the server's workers (and serve's runner) started
        started = descendants(proc.pid)
        assert started, "the command started no server process"
        sent = time.monotonic()
        proc.send_signal(sig)
        proc.wait(timeout=30)
        took = time.monotonic() - sent
        left = [pid for pid in started if alive(pid)]
        assert not left, f"still running after {took:.1f} s: {left}"
        assert not listening(port)
        return took, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_ui_stops_its_mlflow_server_and_workers(home, tmp_path, sig):
    port = free_port()
    took, output = start_and_stop(["ui", "--port", str(port)], port, sig, tmp_path / "ui.log")
    assert took < 15, output
    assert "stopped" in output and "Traceback" not in output, output


@pytest.mark.prefect
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_its_prefect_server_and_runner(home, tmp_path, sig, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    port = free_port()
    args = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    took, output = start_and_stop(args, port, sig, tmp_path / "serve.log", ready="Prefect UI:")
    assert f"http://127.0.0.1:{port}" in output
    assert took < 15, output
    assert "never awaited" not in output and "Traceback" not in output, output
    assert output.rstrip().endswith("stopped"), output


def test_serve_refuses_a_foreign_host_without_auth(home, monkeypatch):
    monkeypatch.delenv("PREFECT_SERVER_API_AUTH_STRING", raising=False)
    result = subprocess.run(
        [*nightrec_command(), "serve", "--host", "192.0.2.10", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    assert result.returncode == 2, result
    assert result.stderr.strip().startswith("refused: refusing to serve the Prefect API on 192.0.2.10"), result.stderr
