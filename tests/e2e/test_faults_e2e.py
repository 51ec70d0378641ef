"""Fault injection, in process: the real tiny model behind the real app, with the runner's forward
made to raise once. That request gets a 500 in the error shape, the engine goes on, the next request
succeeds and the server stays ready. No test hook in production code: the load function wraps it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.e2e.helpers import MODEL, check_error_body, user_text
from tests.unit.server.helpers import LoadFailures, wait_until_ready
from vlmserve.bootstrap import ModelServer, load_model_server
from vlmserve.config import ServerConfig
from vlmserve.server.app import create_app


def _load_with_one_fault(faults: list[str]) -> Any:
    def load(config: ServerConfig) -> ModelServer:
        model_server = load_model_server(config)
        runner = model_server.engine.core.runner
        execute = runner.execute

        def execute_failing_once(scheduler_output: Any) -> Any:
            if not faults:
                faults.append("raised")
                raise RuntimeError("injected fault in the model forward")
            return execute(scheduler_output)

        runner.execute = execute_failing_once
        return model_server

    return load


async def test_a_forward_that_raises_fails_only_its_request(tiny_checkpoint_dir: Path) -> None:
    config = ServerConfig(
        model=str(tiny_checkpoint_dir), served_model_name=MODEL, dtype="float32", num_threads=1
    )
    faults: list[str] = []
    failures = LoadFailures()
    app = create_app(config, _load_with_one_fault(faults), on_load_failure=failures)
    body = {"model": MODEL, "messages": user_text(), "max_tokens": 4}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            await wait_until_ready(client, timeout=120)
            failed = await client.post("/v1/chat/completions", json=body)
            check_error_body(failed, 500, "model execution failed")
            assert faults == ["raised"]
            ok = await client.post("/v1/chat/completions", json=body)
            assert ok.status_code == 200, ok.text
            assert ok.json()["usage"]["completion_tokens"] == 4
            assert (await client.get("/v1/health/ready")).status_code == 200
            metrics = (await client.get("/v1/metrics")).text
            assert 'request_finish_total{finished_reason="error"' in metrics
    assert failures.errors == []
