"""Starting a local Ray (actors.runtime.start_local_ray): a start whose raylet died is retried, nothing else."""

from __future__ import annotations

import pytest

from actors import runtime

TIMED_OUT = ("The current node timed out during startup. This could happen because some of the raylet failed "
             "to startup or the GCS has become overloaded.")


@pytest.fixture
def calls(monkeypatch) -> list:
    """ray.init and ray.shutdown recorded; ray.init fails as the test scripts it (no Ray is started)."""
    log: list = []
    monkeypatch.setattr(runtime.ray, "shutdown", lambda: log.append("shutdown"))
    monkeypatch.setattr(runtime.time, "sleep", lambda s: log.append(("sleep", s)))
    return log


def _init(log: list, failures: list[Exception]):
    def init(**kwargs):
        log.append(("init", kwargs))
        if failures:
            raise failures.pop(0)
    return init


def test_a_raylet_that_died_during_start_up_is_started_again(calls, monkeypatch, caplog) -> None:
    monkeypatch.setattr(runtime.ray, "init", _init(calls, [Exception(TIMED_OUT)]))
    runtime.start_local_ray(num_cpus=2, include_dashboard=False)
    assert calls == [("init", {"num_cpus": 2, "include_dashboard": False}), "shutdown", ("sleep", 10.0),
                     ("init", {"num_cpus": 2, "include_dashboard": False})]
    assert "ray-project/ray#65983" in caplog.text and "attempt 2 of 5" in caplog.text


def test_the_last_attempt_and_any_other_failure_are_raised_as_they_are(calls, monkeypatch) -> None:
    monkeypatch.setattr(runtime.ray, "init", _init(calls, [Exception(TIMED_OUT)] * runtime.LOCAL_START_ATTEMPTS))
    with pytest.raises(Exception, match="timed out during startup"):
        runtime.start_local_ray()
    assert [c for c in calls if c[0] == "init"] == [("init", {})] * runtime.LOCAL_START_ATTEMPTS
    # Spaced out, longer each time, to outlast a spell of load.
    assert [c[1] for c in calls if c[0] == "sleep"] == [10.0, 20.0, 30.0, 40.0]

    calls.clear()
    monkeypatch.setattr(runtime.ray, "init", _init(calls, [ValueError("num_cpus must be >= 0")]))
    with pytest.raises(ValueError, match="num_cpus"):
        runtime.start_local_ray(num_cpus=-1)
    assert calls == [("init", {"num_cpus": -1})]
