"""Schemathesis over our own /openapi.json against a running server: no generated request, valid or
not, gets a 5xx. Runs on `strict_server` (64-token context, so valid requests stay short; private
image URLs refused, so a generated URL is refused before any connection). Loopback only.

Driven through each operation's hypothesis strategy (schemathesis' pytest plugin reads a node
attribute pytest 9 no longer has).
"""

from __future__ import annotations

from collections import Counter

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests.e2e.conftest import RunningServer

MAX_EXAMPLES = 30


def test_no_generated_request_gets_a_5xx(strict_server: RunningServer) -> None:
    spec = httpx.get(strict_server.base_url + "/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(spec)
    schema.config.update(base_url=strict_server.base_url)
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    server_errors: list[str] = []
    statuses: Counter[tuple[str, int]] = Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert any(op.path == "/v1/chat/completions" for op in operations)
    for operation in operations:

        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            derandomize=True,
        )
        @given(case=operation.as_strategy())
        def run(case: schemathesis.Case) -> None:
            response = case.call(base_url=strict_server.base_url, timeout=30)
            statuses[(case.path, response.status_code)] += 1
            if response.status_code >= 500:
                server_errors.append(
                    f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"
                )

        run()
    print("schemathesis statuses:", dict(statuses))
    assert not server_errors, "\n".join(server_errors[:10])
    # every operation was exercised (most generated chat bodies break a rule: 422, never a 5xx)
    assert sum(n for (path, _), n in statuses.items() if path == "/v1/chat/completions") >= MAX_EXAMPLES // 2
