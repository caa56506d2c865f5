"""memprobe runs a step in a fresh process and reports its time, peak extra memory and failures."""

import os
from pathlib import Path


from ssmscale.memprobe import run_isolated

ENV = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}


def test_peak_extra_memory_is_what_the_step_touched_beyond_its_inputs():
    small = run_isolated("memprobe_targets:touch", {"mib": 16}, repeats=2, env=ENV)
    big = run_isolated("memprobe_targets:touch", {"mib": 256}, repeats=2, env=ENV)
    assert small["status"] == big["status"] == "ok"
    assert big["memory_method"] == "VmHWM"
    assert 250 <= big["peak_extra_bytes"] / 2**20 <= 275
    assert small["peak_extra_bytes"] / 2**20 <= 24
    assert len(big["times_ms"]) == 2 and big["median_ms"] > 0 and big["min_ms"] <= big["median_ms"]


def test_allocation_failure_is_reported_as_oom():
    res = run_isolated("memprobe_targets:too_big", repeats=1, env=ENV)
    assert res["status"] == "oom" and "allocate" in res["error"]
    assert res["median_ms"] is None


def test_an_exception_in_the_step_is_reported_with_its_message():
    res = run_isolated("memprobe_targets:raises", repeats=1, env=ENV)
    assert res["status"] == "error"
    assert res["error"] == "ValueError: d_inner must be even"


def test_a_step_that_runs_too_long_is_reported_as_timeout():
    res = run_isolated("memprobe_targets:sleeps", {"seconds": 30}, repeats=1, timeout_s=2, env=ENV)
    assert res["status"] == "timeout"


def test_an_unknown_function_is_an_error_not_a_crash():
    res = run_isolated("memprobe_targets:nope", env=ENV)
    assert res["status"] == "error" and "nope" in res["error"]
