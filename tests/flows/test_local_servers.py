"""The local servers let no one else in: a request with a foreign Host or Origin (a web page in a browser on this
machine, cross-origin or through DNS rebinding) is refused and starts nothing (issue 14; before, the Prefect API of
`nightrec serve` answered any origin and such a `create_flow_run` got 201 and ran)."""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import time

import httpx
import pytest

from nightrec.deployments.guard import own_addresses, refusal
from nightrec.deployments.server import server_environment
from nightrec.settings import Settings
from tests.flows.processes import nightrec_command
from tests.flows.test_deployments import free_port

EVIL = "evil.example"
AUTH = "nightrec:correct-horse"


# --- the rule -----------------------------------------------------------------------------------------------------
def test_only_the_servers_own_host_and_origin_pass():
    hosts, origins = own_addresses("127.0.0.1", 4200)
    assert refusal("127.0.0.1:4200", None, hosts, origins) is None  # a program: no Origin
    assert refusal("localhost:4200", "http://localhost:4200", hosts, origins) is None  # the UI itself
    assert "Host" in refusal(f"{EVIL}:4200", None, hosts, origins)  # DNS rebinding
    assert "Host" in refusal("127.0.0.1:4201", None, hosts, origins)  # another port is another origin
    assert "Host" in refusal(None, None, hosts, origins)
    assert "Origin" in refusal("127.0.0.1:4200", f"http://{EVIL}", hosts, origins)
    assert "Origin" in refusal("127.0.0.1:4200", "null", hosts, origins)  # sandboxed iframes, file:// pages
    assert "Origin" in refusal("127.0.0.1:4200", "http://127.0.0.1:8080", hosts, origins)


def through_guard(scope: dict) -> tuple[tuple, list[str]]:
    """One request through :class:`OwnOriginOnly` for 127.0.0.1:4200: (its first reply as (type, status or close
    code), or () when it passed; the scope types that reached the app behind it)."""
    import asyncio

    from nightrec.deployments.guard import OwnOriginOnly

    reached: list[str] = []
    sent: list[dict] = []

    async def app(scope, receive, send):
        reached.append(scope["type"])

    async def receive():
        return {"type": "websocket.connect"}

    async def send(message):
        sent.append(message)

    asyncio.run(OwnOriginOnly(app, *own_addresses("127.0.0.1", 4200))(scope, receive, send))
    reply = (sent[0]["type"], sent[0].get("status", sent[0].get("code"))) if sent else ()
    return reply, reached


def request(kind: str, **headers: str) -> dict:
    return {"type": kind, "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}


def test_the_guard_stops_foreign_requests_and_websockets_before_the_app():
    own = "127.0.0.1:4200"
    assert through_guard(request("http", host=own, origin=f"http://{EVIL}")) == (("http.response.start", 403), [])
    assert through_guard(request("websocket", host=own, origin=f"http://{EVIL}")) == (("websocket.close", 1008), [])
    assert through_guard(request("websocket", host=f"{EVIL}:4200")) == (("websocket.close", 1008), [])
    assert through_guard(request("http", host=own)) == ((), ["http"])
    assert through_guard(request("websocket", host=own, origin=f"http://{own}")) == ((), ["websocket"])
    assert through_guard({"type": "lifespan"}) == ((), ["lifespan"])


def test_a_non_loopback_server_needs_the_auth_string():
    with pytest.raises(ValueError, match="PREFECT_SERVER_API_AUTH_STRING"):
        server_environment("10.1.2.3", 4200, {})
    with pytest.raises(ValueError, match="address clients use"):
        server_environment("0.0.0.0", 4200, {"PREFECT_SERVER_API_AUTH_STRING": AUTH})
    env = server_environment("10.1.2.3", 4200, {"PREFECT_SERVER_API_AUTH_STRING": AUTH})
    assert env["PREFECT_SERVER_CORS_ALLOWED_ORIGINS"] == "http://10.1.2.3:4200,https://10.1.2.3:4200"
    local = server_environment("127.0.0.1", 4200, {})
    assert "*" not in local["PREFECT_SERVER_CORS_ALLOWED_ORIGINS"] and local["PREFECT_SERVER_CSRF_PROTECTION_ENABLED"]


def test_the_nights_temporary_server_answers_no_web_page(home):
    from nightrec.settings import prefect_environment

    assert prefect_environment(Settings())["PREFECT_SERVER_CORS_ALLOWED_ORIGINS"] == "http://127.0.0.1"  # no port


# --- the Prefect server of `nightrec serve` -----------------------------------------------------------------------
@contextlib.contextmanager
def api_client(api_url: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    with (
        temporary_settings({PREFECT_API_URL: api_url, PREFECT_API_AUTH_STRING: AUTH}),
        get_client(sync_client=True) as c,
    ):
        yield c


def flow_runs(client) -> list:
    from prefect.client.schemas.sorting import FlowRunSort

    return client.read_flow_runs(limit=50, sort=FlowRunSort.ID_DESC)


@pytest.mark.prefect
def test_the_prefect_server_refuses_foreign_origins_and_hosts(home, monkeypatch):
    from nightrec.deployments.serve import local_server

    monkeypatch.setenv("PREFECT_SERVER_API_AUTH_STRING", AUTH)
    settings = Settings()
    settings.prefect_home_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with local_server(settings, port) as api_url:
        with api_client(api_url) as client:  # our own client: CSRF token, basic auth
            flow_id = client.create_flow_from_name("probe")
            assert flow_runs(client) == []
        authorised = {"Authorization": "Basic " + base64.b64encode(AUTH.encode()).decode()}
        create = f"{api_url}/flow_runs/"
        body = {"flow_id": str(flow_id), "name": "from-evil"}
        own = f"127.0.0.1:{port}"
        hostile = [
            {**authorised, "Origin": f"http://{EVIL}"},  # a page on evil.example, cross-origin
            {**authorised, "Host": EVIL, "Origin": f"http://{EVIL}"},  # the same page after DNS rebinding
            {**authorised, "Host": f"{EVIL}:{port}"},
        ]
        with httpx.Client(timeout=10) as http:
            for headers in hostile:
                response = http.post(create, json=body, headers=headers)
                assert response.status_code == 403, (headers, response.status_code, response.text)
                assert "access-control-allow-origin" not in response.headers
            preflight = http.options(
                create, headers={"Origin": f"http://{EVIL}", "Access-Control-Request-Method": "POST"}
            )
            assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers
            own_preflight = http.options(
                create, headers={"Origin": f"http://{own}", "Access-Control-Request-Method": "POST"}
            )
            assert own_preflight.headers.get("access-control-allow-origin") == f"http://{own}"
            anonymous = http.post(create, json=body)  # right Host, no credentials (nor a CSRF token)
            assert anonymous.status_code in (401, 403) and "refused" not in anonymous.text, anonymous.text
            assert http.get(f"{api_url}/flows/{flow_id}").status_code == 401  # a read needs them too
            assert http.get(f"{api_url}/health").status_code == 200  # probes need no credentials
        with api_client(api_url) as client:
            assert flow_runs(client) == []  # nothing was created, so nothing can run


# --- the MLflow UI of `nightrec ui` -------------------------------------------------------------------------------
@contextlib.contextmanager
def mlflow_ui(port: int, log):
    proc = subprocess.Popen(
        [*nightrec_command(), "ui", "--port", str(port)],
        env=dict(os.environ),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "nightrec ui exited"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the MLflow UI did not come up"
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_the_mlflow_ui_refuses_foreign_origins_and_hosts(home, tmp_path):
    port = free_port()
    with (tmp_path / "ui.log").open("wb") as log, mlflow_ui(port, log) as url:
        create = f"{url}/api/2.0/mlflow/experiments/create"
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=100"
        with httpx.Client(timeout=10) as http:
            assert http.post(create, json={"name": "evil-1"}, headers={"Origin": f"http://{EVIL}"}).status_code == 403
            assert http.post(create, json={"name": "evil-2"}, headers={"Host": EVIL}).status_code == 403
            assert http.get(search, headers={"Host": f"{EVIL}:{port}"}).status_code == 403
            assert http.get(search, headers={"Host": "127.0.0.1:1"}).status_code == 403  # only its own port
            assert http.post(create, json={"name": "ours"}).status_code == 200
            names = {e["name"] for e in http.get(search).json()["experiments"]}
    assert "ours" in names and not names & {"evil-1", "evil-2"}
