"""CORS over real HTTP: off by default; with --cors-allow-origin, preflights and responses carry
the CORS headers for the allowed origins only, and a refused preflight carries none."""

from __future__ import annotations

import base64

import httpx
import pytest
from pydantic import ValidationError

from server.settings import ServerSettings, settings_from_args

pytestmark = pytest.mark.slow

ALLOWED = "https://app.example.com"
OTHER = "https://elsewhere.example.com"
KEY = "cors-test-key"


def preflight(server, origin: str, method: str = "POST", headers: str | None = None):
    """What a browser sends before a cross-origin POST with a JSON body and a bearer key."""
    request_headers = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers is not None:
        request_headers["Access-Control-Request-Headers"] = headers
    with server.client() as c:
        return c.options("/v1/embeddings", headers=request_headers)


def cors_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.lower().startswith("access-control-")}


@pytest.fixture(scope="module")
def cors_server(make_server):
    return make_server(cors_allow_origin=[ALLOWED], api_key=KEY)


def test_cors_is_off_by_default(server):
    assert server.settings.cors_allow_origin == []
    response = preflight(server, ALLOWED, headers="authorization, content-type")
    assert response.status_code == 405
    assert cors_headers(response) == {}
    with server.client() as c:
        assert cors_headers(c.get("/health", headers={"Origin": ALLOWED})) == {}


def test_preflight_from_an_allowed_origin_gets_the_cors_headers(cors_server):
    response = preflight(cors_server, ALLOWED, headers="authorization, content-type")
    assert response.status_code == 200
    headers = cors_headers(response)
    assert headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in headers["access-control-allow-methods"].split(", ")
    allowed_headers = headers["access-control-allow-headers"].lower().split(", ")
    assert {"authorization", "content-type"} <= set(allowed_headers)


def test_responses_to_an_allowed_origin_can_be_read_by_its_pages(cors_server, photo_jpegs):
    body = {"input": "data:image/jpeg;base64," + base64.b64encode(photo_jpegs[0]).decode()}
    with cors_server.client() as c:
        ok = c.post(
            "/v1/embeddings",
            json=body,
            headers={"Origin": ALLOWED, "Authorization": f"Bearer {KEY}"},
        )
        refused = c.post("/v1/embeddings", json=body, headers={"Origin": ALLOWED})
    assert ok.status_code == 200 and len(ok.json()["data"]) == 1
    assert ok.headers["access-control-allow-origin"] == ALLOWED
    assert "x-total-time" in ok.headers["access-control-expose-headers"].split(", ")
    # An error is readable too, so the page can show why it was refused.
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == ALLOWED


def test_a_disallowed_origin_gets_no_cors_headers(cors_server):
    response = preflight(cors_server, OTHER, headers="content-type")
    assert response.status_code == 400
    assert cors_headers(response) == {}
    error = response.json()["error"]
    assert error["code"] == "cors_preflight_refused"
    assert OTHER in error["message"] and "origin" in error["message"]
    with cors_server.client() as c:
        health = c.get("/health", headers={"Origin": OTHER})
    assert health.status_code == 200
    assert "access-control-allow-origin" not in health.headers


def test_a_method_the_api_does_not_take_is_refused_even_from_an_allowed_origin(cors_server):
    response = preflight(cors_server, ALLOWED, method="DELETE")
    assert response.status_code == 400
    assert cors_headers(response) == {}
    assert "method" in response.json()["error"]["message"]


def test_star_allows_any_origin(make_server):
    server = make_server(cors_allow_origin=["*"])
    response = preflight(server, OTHER, headers="content-type")
    assert response.status_code == 200
    assert cors_headers(response)["access-control-allow-origin"] == "*"


def test_origins_come_from_repeated_flags_or_a_comma_separated_variable(monkeypatch):
    monkeypatch.setenv("SSOLE_SERVER_CORS_ALLOW_ORIGIN", f"{ALLOWED}, {OTHER}")
    assert ServerSettings(model="m").cors_allow_origin == [ALLOWED, OTHER]
    flags = [
        "--model",
        "m",
        "--cors-allow-origin",
        OTHER,
        "--cors-allow-origin",
        "http://[::1]:3000",
    ]
    assert settings_from_args(flags).cors_allow_origin == [OTHER, "http://[::1]:3000"]


@pytest.mark.parametrize("origin", ["https://app.example.com/", "app.example.com", "https://"])
def test_an_origin_with_a_path_or_no_scheme_is_refused_naming_the_setting(origin):
    with pytest.raises(ValidationError, match="cors_allow_origin"):
        ServerSettings(model="m", cors_allow_origin=[origin])
