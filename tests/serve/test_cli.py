"""`lowregret serve` as a user runs it: a process that listens, answers, and stops on Ctrl-C."""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time

from tests.serve.conftest import Client


def _wait_for_line(proc: subprocess.Popen, pattern: str, timeout_s: float) -> re.Match:
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline and proc.poll() is None:
        if selector.select(timeout=0.5):
            line = proc.stdout.readline()
            seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match
    raise AssertionError(
        f"no line matching {pattern!r} within {timeout_s} s; stdout: {seen}; rc={proc.poll()}"
    )


def test_serve_command_listens_answers_and_stops(base_dir, adapters):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "flows.cli", "serve", "--base", str(base_dir), "--base-name", "tiny-base",
           "--adapter-dir", f"paris={adapters['paris']}", "--port", "0", "--max-adapters", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        url = _wait_for_line(proc, r"listening on (http://127\.0\.0\.1:\d+)", timeout_s=120)[1]
        status, body = Client(url).complete("paris", max_tokens=4, temperature=0)
        assert status == 200 and body["usage"]["completion_tokens"] == 4
        assert Client(url).complete("docs")[0] == 404
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_refuses_a_missing_adapter_before_loading_the_model(base_dir, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "serve",
            "--base",
            str(base_dir),
            "--adapter-dir",
            f"x={tmp_path / 'nope'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert (
        "lowregret serve: error:" in result.stderr
        and "neither a directory nor a registry reference" in result.stderr
    )


def _serve_exit(base_dir, *flags):
    cmd = [sys.executable, "-m", "flows.cli", "serve", "--base", str(base_dir), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_serve_on_a_port_in_use_or_out_of_range_says_so_before_loading_the_model(base_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flags, words in [
            (["--port", str(port)], f"port {port} on 127.0.0.1 is already in use"),
            (["--port", "70000"], "--port must be between 0 and 65535"),
            (["--host", "no-such-host.invalid"], "not an address this machine can listen on"),
        ]:
            result = _serve_exit(base_dir, *flags)
            assert result.returncode == 2, (flags, result.stderr)
            assert words in result.stderr and "Traceback" not in result.stderr, result.stderr
            assert "Loading weights" not in result.stderr  # refused before the model loads
