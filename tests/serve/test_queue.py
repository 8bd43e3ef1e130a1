"""Dynamic batching, the bounded queue and slow bodies, with real concurrent HTTP requests.

The generation thread is held at the pool's lock (as a long batch or an adapter load would hold
it) so that requests pile up deterministically; /metrics shows what happened. The batching
window's timing is tested on a scripted clock.
"""

from __future__ import annotations

import re
import socket
import threading
import time

import pytest

from tests.serve.conftest import Client, start


def metric(client, name: str) -> float:
    """The value of one Prometheus sample, e.g. `lowregret_batches_total` or `..._bucket{le="2"}`."""
    text = client.raw("GET", "/metrics")[1].decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics:\n{text}"
    return float(match[1])


def wait_for(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def ask_in_threads(client, models, results):
    def ask(i, model):
        results[i] = client.complete(model, max_tokens=6, temperature=0)

    threads = [threading.Thread(target=ask, args=(i, m)) for i, m in enumerate(models)]
    for t in threads:
        t.start()
    return threads


@pytest.fixture(scope="module")
def server(base_dir, adapters):
    running = start(base_dir, adapters, max_pending=6, body_timeout_s=1.0, header_timeout_s=1.0)
    yield running
    running.stop()


def test_requests_that_arrive_together_share_a_mixed_batch(server):
    client = Client(server.url)
    models = ["paris", "docs", "tiny-base"] * 2
    alone = {m: client.complete(m, max_tokens=6, temperature=0)[1]["choices"][0]["text"] for m in set(models)}
    batches_before = metric(client, "lowregret_batches_total")
    mixed_before = metric(client, "lowregret_mixed_batches_total")
    small_before = metric(client, 'lowregret_batch_size_bucket{le="2"}')
    results: dict = {}
    with server.engine.pool.lock:  # generation waits here, requests queue up
        threads = ask_in_threads(client, models, results)
        wait_for(lambda: metric(client, "lowregret_requests_waiting") == len(models))
    for t in threads:
        t.join(timeout=60)
    assert {i: r[1]["choices"][0]["text"] for i, r in results.items()} == {i: alone[m] for i, m in enumerate(models)}
    # The first batch holds what arrived within its window; everything queued behind it forms the
    # next one: at most two generate calls, at least one of them mixing adapters with 3+ rows.
    assert metric(client, "lowregret_batches_total") - batches_before <= 2
    assert metric(client, "lowregret_mixed_batches_total") > mixed_before
    assert metric(client, 'lowregret_batch_size_bucket{le="2"}') - small_before < 2
    assert metric(client, "lowregret_requests_waiting") == 0
    assert metric(client, "lowregret_generation_tokens_total") >= 6 * len(models)
    sizes = client.call("GET", "/health")[1]["stats"]["batch_sizes"]  # rows per generate call -> calls
    assert max(int(rows) for rows in sizes) >= 3 and sum(sizes.values()) == metric(client, "lowregret_batches_total")


def test_a_full_queue_answers_429_then_recovers(server):
    client = Client(server.url)
    results: dict = {}
    with server.engine.pool.lock:
        threads = ask_in_threads(client, ["paris"] * server.engine.max_pending, results)
        wait_for(lambda: metric(client, "lowregret_requests_waiting") == server.engine.max_pending)
        status, body, headers = client.raw("POST", "/v1/completions", b'{"model": "docs", "prompt": "a"}',
                                           {"Content-Type": "application/json"})  # fmt: skip
        assert status == 429 and headers["Retry-After"] == "1" and b"queue_full" in body
        assert client.raw("GET", "/ready")[0] == 503
    for t in threads:
        t.join(timeout=60)
    assert [r[0] for r in results.values()] == [200] * server.engine.max_pending
    assert client.raw("GET", "/ready")[0] == 200
    assert client.complete("docs", max_tokens=2)[0] == 200
    assert metric(client, 'lowregret_http_requests_total{method="POST",route="/v1/completions",status="429"}') == 1


def test_a_body_shorter_than_its_content_length_gets_408_and_blocks_no_one(server):
    host, port = server.url.removeprefix("http://").split(":")
    slow = socket.create_connection((host, int(port)), timeout=30)
    started = time.monotonic()
    try:
        slow.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"model": "paris", '
        )
        # Other clients are served while the slow one dawdles.
        assert Client(server.url).complete("docs", max_tokens=2)[0] == 200
        answer = b""
        while chunk := slow.recv(65536):
            answer += chunk
        elapsed_s = time.monotonic() - started
    finally:
        slow.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"did not arrive within 1 s" in answer and b"1000 bytes" in answer
    assert elapsed_s < 10  # the server's body timeout is 1 s here; it used to be a 60 s socket timeout


class _ScriptedArrivals:
    """Stands in for the engine's queue and clock: jobs arrive at scripted times on a fake clock,
    so the batching window is tested exactly, whatever the load on the machine."""

    def __init__(self, arrival_times_s):
        from concurrent.futures import Future

        from serving.engine import _Job

        self.now_s = 0.0
        self.arrivals = [(t, _Job(None, Future())) for t in arrival_times_s]

    def monotonic(self) -> float:
        return self.now_s

    def get(self, timeout=None):
        import queue

        if self.arrivals and self.arrivals[0][0] <= self.now_s + timeout:
            arrival_s, job = self.arrivals.pop(0)
            self.now_s = max(self.now_s, arrival_s)
            return job
        self.now_s += timeout
        raise queue.Empty

    def get_nowait(self):
        return self.get(timeout=0.0)


@pytest.mark.parametrize(
    "arrivals_s,expected,rows,closed_at_s",
    [
        ([0.01, 0.025, 0.04, 0.2], 0, 4, 0.06),  # each within 20 ms of the previous; 0.2 s is a new batch
        ([0.03], 0, 1, 0.02),  # a lone request waits one window
        ([0.015 * i for i in range(1, 20)], 0, 6, 0.08),  # never quiet: closed by the longest wait
        ([0.005, 0.01, 0.015], 3, 3, 0.01),  # as many as the previous batch: closed without waiting
        ([0.005, 0.005, 0.005, 0.01], 2, 4, 0.005),  # ... but what is already queued joins
        ([0.03], 1, 1, 0.0),  # the previous batch was one request: a lone request does not wait
        ([0.01, 0.025, 0.2], 8, 3, 0.045),  # fewer came back than last time: the window closes it
    ],
)
def test_a_batch_takes_requests_that_follow_each_other_within_the_window_up_to_the_longest_wait(
    server, monkeypatch, arrivals_s, expected, rows, closed_at_s
):
    from types import SimpleNamespace

    import serving.engine
    from serving.engine import Engine

    engine = Engine(server.engine.pool.model, server.engine.renderer.tokenizer, "b", batch_window_s=0.02,
                    max_batch_wait_s=0.08, max_batch_size=64)  # fmt: skip
    engine.stop()  # no generation thread: the test drives _collect itself
    engine._expected = expected  # rows of the previous batch
    script = _ScriptedArrivals(arrivals_s)
    monkeypatch.setattr(engine, "_queue", script)
    monkeypatch.setattr(serving.engine, "time", SimpleNamespace(monotonic=script.monotonic))  # this module only
    batch = engine._collect(_ScriptedArrivals([0]).arrivals[0][1])  # the first job, at t = 0
    assert len(batch) == rows
    assert script.now_s == pytest.approx(closed_at_s)


def test_a_seeded_request_samples_the_same_alone_and_in_a_mixed_batch(server):
    """OpenAI's `seed`: the one generation helper draws a seeded row from its own hashed uniforms (as RL's
    episodes), so the same seed gives the same sampled text whatever shares its batch."""
    client = Client(server.url)

    def ask(model, seed):
        status, body = client.complete(model, max_tokens=8, temperature=1.0, seed=seed)
        assert status == 200, body
        return body["choices"][0]["text"]

    alone = {seed: ask("paris", seed) for seed in (1, 2, 3)}
    assert len(set(alone.values())) > 1  # sampled, not greedy
    results: dict = {}
    with server.engine.pool.lock:  # the requests queue up and share one batch with other adapters' rows
        threads = [threading.Thread(target=lambda s=s: results.__setitem__(s, ask("paris", s))) for s in (1, 2, 3)]
        threads += [threading.Thread(target=lambda: client.complete("docs", max_tokens=4, temperature=0.7))]
        for t in threads:
            t.start()
        wait_for(lambda: metric(client, "lowregret_requests_waiting") == 4)
    for t in threads:
        t.join(timeout=60)
    assert results == alone


def test_connections_that_never_finish_their_headers_are_dropped(server):
    """Slowloris: 100 sockets send a request line and part of the headers, some trickling a byte now and
    then. The header deadline (header_timeout_s=1 here) closes every one of them; the server answers on."""
    import socket
    from urllib.parse import urlsplit

    address = urlsplit(server.url)
    sockets = []
    for _ in range(100):
        conn = socket.create_connection((address.hostname, address.port), timeout=10)
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        sockets.append(conn)
    started = time.monotonic()
    for _ in range(6):  # trickle: uvicorn's own keep-alive timer restarts on every byte
        time.sleep(0.3)
        for conn in sockets[:10]:
            try:
                conn.sendall(b"a")
            except OSError:
                pass
    closed = 0
    for conn in sockets:
        try:
            closed += conn.recv(1) == b""
        except ConnectionResetError:
            closed += 1
        except TimeoutError:  # still open after 10 s: not dropped
            pass
        conn.close()
    assert closed == 100 and time.monotonic() - started < 15
    status, body = Client(server.url).complete("paris", max_tokens=2, temperature=0)
    assert status == 200, body
