"""Bounded property-based fuzzing of the live API from its own ``/openapi.json`` (schemathesis + hypothesis).

Valid and invalid requests to ``POST /v1/shots``, ``GET /v1/jobs/{id}`` and ``DELETE /v1/jobs/{id}``: none may
answer 5xx, every status must be one the schema documents, and every JSON answer must match its documented
schema.  The server's limits (64x64 frames, 200 frames, 10 steps, a queue of 3) keep any job the fuzzer happens
to get accepted tiny; whatever it queued is cancelled afterwards.
"""

from __future__ import annotations

import pytest
from serve_helpers import cancel_all

pytestmark = [pytest.mark.ray, pytest.mark.slow]

schemathesis = pytest.importorskip("schemathesis")

OPERATIONS = [("/v1/shots", "POST"), ("/v1/jobs/{job_id}", "GET"), ("/v1/jobs/{job_id}", "DELETE")]


def test_fuzz_openapi(serve_env, client):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_dict(client.get("/openapi.json").json())
    auth = {"Authorization": client.headers["Authorization"]}
    strategies = [schema[path][method].as_strategy(mode, headers=auth)
                  for path, method in OPERATIONS for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    seen: dict[int, int] = {}

    @settings(max_examples=300, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=st.one_of(strategies))
    def run(case):
        response = case.call_and_validate(base_url=serve_env.base_url, headers=auth, checks=checks)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1

    try:
        run()
    finally:
        cancel_all(client)
    assert seen and max(seen) < 500, seen
    assert 422 in seen and 404 in seen, seen  # both rejection paths were exercised
