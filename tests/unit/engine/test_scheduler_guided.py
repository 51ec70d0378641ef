"""The scheduler ends a request on its runner's structured-output reports: a complete guide is STOP
(ignore_eos or not, and before the LENGTH check), a failed one is ERROR with the reason."""

from __future__ import annotations

import pytest

from tests.unit.engine.test_scheduler import (
    FakeRunner,
    RunResult,
    add_all,
    assert_blocks_released,
    create_requests,
    create_scheduler,
)
from vlmserve.protocol.types import FinishReason


@pytest.mark.parametrize(
    ("report", "max_tokens", "finish_reason", "num_tokens"),
    [
        # a complete guide stops the request, ignore_eos or not
        ("finished", 4, FinishReason.STOP, 2),
        # completing on the last allowed token is a whole answer: STOP, not LENGTH
        ("finished", 2, FinishReason.STOP, 2),
        ("error", 4, FinishReason.ERROR, 2),
    ],
)
def test_guide_reports_end_the_request(
    report: str, max_tokens: int, finish_reason: FinishReason, num_tokens: int
) -> None:
    scheduler = create_scheduler()
    add_all(scheduler, create_requests(1, max_tokens=max_tokens, ignore_eos=True))
    runner = FakeRunner()
    result = RunResult()
    for _ in range(num_tokens):
        scheduler_output = scheduler.schedule()
        runner_output = runner.execute(scheduler_output)
        if len(result.token_ids.get("0", [])) == num_tokens - 1:
            if report == "finished":
                runner_output.guides_finished.add("0")
            else:
                runner_output.guide_errors["0"] = "token 5 is not allowed"
        result.collect(scheduler_output, scheduler.update_from_output(scheduler_output, runner_output))
    assert scheduler.num_unfinished_requests == 0
    assert_blocks_released(scheduler)
    assert len(result.token_ids["0"]) == num_tokens
    assert result.finish_reasons["0"] is finish_reason
    final = result.outputs[-1]
    assert final.error == ("structured output failed: token 5 is not allowed" if report == "error" else None)
