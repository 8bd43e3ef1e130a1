"""The admin API attacked as a web page or a stray client would: each attempt is refused and changes
nothing, and no answer discloses where files live."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.serve.conftest import ADMIN, ADMIN_TOKEN, Client, start


@pytest.fixture(scope="module")
def layout(adapters, tmp_path_factory):
    """An adapter root holding `docs`, a symlink to a folder outside it, and an adapter outside it."""
    tmp = tmp_path_factory.mktemp("admin")
    root, outside = tmp / "root", tmp / "outside"
    root.mkdir()
    shutil.copytree(adapters["docs"], root / "docs")
    shutil.copytree(adapters["paris"], outside / "paris")
    (root / "link").symlink_to(outside / "paris", target_is_directory=True)
    return {"tmp": tmp, "root": root, "outside": outside}


@pytest.fixture(scope="module")
def server(base_dir, adapters, layout):
    running = start(base_dir, {"paris": adapters["paris"]}, adapter_roots=(layout["root"],))
    yield running
    running.stop()


def served(client) -> set[str]:
    return {m["id"] for m in client.call("GET", "/v1/models")[1]["data"]}


def assert_no_local_path(data: bytes | str, layout) -> None:
    text = data.decode() if isinstance(data, bytes) else data
    for path in (layout["tmp"], Path(os.path.realpath(layout["tmp"])), Path.cwd(), Path.home()):
        assert str(path) not in text, f"{path} disclosed in {text}"


def test_admin_routes_are_off_without_a_token(base_dir, adapters, layout):
    running = start(base_dir, {"paris": adapters["paris"]}, admin_token=None, adapter_roots=(layout["root"],))
    try:
        client = Client(running.url)
        for method, path, payload in [
            ("POST", "/v1/adapters", {"name": "docs", "source": "docs"}),
            ("POST", "/v1/load_lora_adapter", {"lora_name": "docs", "lora_path": "docs"}),
            ("DELETE", "/v1/adapters/paris", None),
            ("POST", "/v1/unload_lora_adapter", {"lora_name": "paris"}),
        ]:
            status, body = client.call(method, path, payload, {"Authorization": "Bearer anything"})
            assert status == 403 and body["error"]["code"] == "admin_disabled", (path, body)
            assert "--admin-token" in body["error"]["message"]
        assert served(client) == {"tiny-base", "paris"}
    finally:
        running.stop()


def test_a_cross_site_request_with_a_rebound_host_loads_nothing(server, layout):
    """The issue's attack: text/plain (no CORS preflight), a foreign Origin, and Host: evil.example
    (DNS rebinding), aimed at a folder outside the adapter roots."""
    client = Client(server.url)
    body = json.dumps({"name": "stolen", "source": str(layout["outside"] / "paris")}).encode()
    attack = {"Content-Type": "text/plain", "Origin": "http://evil.example", "Host": "evil.example"}
    for headers, status, words in [
        (attack, 403, "DNS rebinding"),
        ({**attack, **ADMIN}, 403, "DNS rebinding"),  # even with a leaked token
        ({**ADMIN, "Content-Type": "text/plain", "Origin": "http://evil.example"}, 403, "Cross-origin"),
        ({**ADMIN, "Content-Type": "text/plain"}, 415, "application/json"),
        ({**ADMIN, "Content-Type": "application/x-www-form-urlencoded"}, 415, "application/json"),
        ({"Content-Type": "application/json"}, 401, "Bearer"),
        ({"Content-Type": "application/json", "Authorization": f"Bearer {ADMIN_TOKEN}x"}, 401, "Bearer"),
    ]:
        status_got, data, _ = client.raw("POST", "/v1/adapters", body, headers)
        assert status_got == status and words in json.loads(data)["error"]["message"], (headers, data)
    assert served(client) == {"tiny-base", "paris"}
    # Same-origin requests through the bound address (and localhost) pass the host check.
    port = server.url.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        headers = {**ADMIN, "Content-Type": "application/json", "Host": host, "Origin": f"http://{host}"}
        status, data, _ = client.raw("POST", "/v1/adapters", json.dumps({"name": "d", "source": "docs"}).encode(), headers)
        assert status == 201, data
        assert client.call("DELETE", "/v1/adapters/d", headers=ADMIN)[0] == 200


def test_sources_outside_the_adapter_roots_are_refused_and_no_answer_shows_a_path(server, layout):
    client = Client(server.url)
    answers: list[bytes] = []

    def load(source, name="x"):
        status, data, _ = client.raw(
            "POST",
            "/v1/adapters",
            json.dumps({"name": name, "source": source}).encode(),
            {**ADMIN, "Content-Type": "application/json"},
        )
        answers.append(data)
        return status, json.loads(data)

    for source in [
        str(layout["outside"] / "paris"),  # an absolute path elsewhere on disk
        "../outside/paris",  # climbing out of the root
        str(layout["root"] / ".." / "outside" / "paris"),
        "link",  # a symlink inside the root that points outside
        "/etc",
        "docs/../../outside/paris",
    ]:
        status, body = load(source)
        assert status == 400 and "adapter root" in body["error"]["message"], (source, body)
    assert served(client) == {"tiny-base", "paris"}

    status, body = load(str(layout["root"] / "docs"), name="docs-abs")  # absolute, but inside the root
    assert status == 201 and body["source"] == "docs", body
    status, body = load("docs", name="docs-rel")
    assert status == 201 and body["source"] == "docs"
    status, body = load("nothere", name="y")
    assert status == 400
    for path in ("/v1/models", "/health", "/metrics"):
        answers.append(client.raw("GET", path)[1])
    for data in answers:
        assert_no_local_path(data, layout)
    models = {m["id"]: m for m in client.call("GET", "/v1/models")[1]["data"]}
    assert models["paris"]["root"] == "paris" and models["docs-abs"]["lora"]["source"] == "docs"
    for name in ("docs-abs", "docs-rel"):
        assert client.call("DELETE", f"/v1/adapters/{name}", headers=ADMIN)[0] == 200
