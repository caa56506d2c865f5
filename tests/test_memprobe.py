"""memprobe runs a step in a fresh process and reports its time, peak extra memory and failures."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssmscale.bench.memprobe import Competitors, run_isolated

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


def test_with_competitors_every_repeat_is_also_timed_beside_them_and_next_to_a_matmul():
    res = run_isolated("memprobe_targets:touch", {"mib": 1}, repeats=3, compete=1, matmul_peak=True, env=ENV)
    assert res["status"] == "ok"
    assert len(res["times_compete_ms"]) == len(res["times_ms"]) == 3 and res["median_compete_ms"] > 0
    assert res["peak_flops"] > 1e8                  # any CPU multiplies faster than 0.1 GFLOP/s
    plain = run_isolated("memprobe_targets:touch", {"mib": 1}, repeats=1, env=ENV)
    assert plain["times_compete_ms"] == [] and plain["peak_flops"] is None


def _state(pid):
    """The process's state letter from /proc (R running, S sleeping, T stopped, Z zombie), or None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _settles(pid, states, seconds=10):
    """Whether the process reaches one of `states` (None: gone) within `seconds` (signals land asynchronously)."""
    deadline = time.time() + seconds
    while _state(pid) not in states and time.time() < deadline:
        time.sleep(0.02)
    return _state(pid) in states


def _cpu_ticks(pid):
    return sum(int(x) for x in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13])


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads process states from /proc")
def test_competitors_burn_cpu_pause_on_request_and_are_gone_after_the_block():
    with Competitors(2) as c:
        procs = list(c.procs)
        time.sleep(0.5)
        assert min(_cpu_ticks(p.pid) for p in procs) > 0
        c.pause()
        assert all(_settles(p.pid, {"T"}) for p in procs)
        c.resume()
        assert all(_settles(p.pid, {"R", "S"}) for p in procs)
    assert all(p.poll() is not None for p in procs) and c.procs == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_competitors_die_with_a_measuring_process_that_is_killed():
    code = ("import time\nfrom ssmscale.bench.memprobe import Competitors\n"
            "c = Competitors(1).__enter__()\nc.pause()\nprint(c.procs[0].pid, flush=True)\ntime.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    assert _settles(pid, {"T"})                    # paused: it would never look at its parent again
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    assert _settles(pid, {None, "Z"})
