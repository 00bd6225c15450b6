"""Requests generated from the server's own OpenAPI schema (schemathesis) never get a 5xx.

Schemathesis' Python API drives hypothesis directly (its pytest plugin does not support the
pytest version in use); every operation in ``/openapi.json`` gets a bounded number of examples.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

pytestmark = pytest.mark.slow

EXAMPLES_PER_OPERATION = 25


def fuzz(operation, base_url: str, seen: dict[str, set[int]]) -> None:
    """Send generated requests for one operation; fail on any 5xx or off-contract error."""
    label = f"{operation.method.upper()} {operation.path}"

    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def check(case):
        response = case.call(base_url=base_url, timeout=60)
        seen.setdefault(label, set()).add(response.status_code)
        assert response.status_code < 500, f"{label}: {response.status_code} {response.text}"
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "code"}

    check()


def test_generated_requests_never_get_a_server_error(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", wait_for_schema=30)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/embeddings", "/v1/embeddings/upload"}
    seen: dict[str, set[int]] = {}
    for operation in operations:
        fuzz(operation, server.url, seen)
    # The generator reached the rejecting side of both embedding routes.
    assert any(code >= 400 for code in seen["POST /v1/embeddings"])
    assert any(code >= 400 for code in seen["POST /v1/embeddings/upload"])
