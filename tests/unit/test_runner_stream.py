"""Runner.stream: input written piece by piece reaches the child whole and in order;
a child that fails early or hangs is reported, never waited on forever."""

from __future__ import annotations

import time

import pytest

from policy_agent.dataplane.runner import CommandError, Runner


def test_pieces_arrive_whole_and_in_order():
    s = Runner(None).stream(["cat"])
    pieces = [f"line {i}\n" * 50 for i in range(400)]  # ~3 MB: more than a pipe buffer
    for p in pieces:
        s.write(p)
    assert s.wait() == "".join(pieces)


def test_a_child_that_exits_early_is_an_error_with_its_stderr():
    s = Runner(None).stream(["sh", "-c", "head -c 10 >/dev/null; echo refused >&2; exit 3"])
    for _ in range(2000):
        s.write("x" * 1000 + "\n")  # written after the child is gone: drained, not raised here
    with pytest.raises(CommandError) as err:
        s.wait()
    assert err.value.returncode == 3 and "refused" in err.value.stderr


def test_kill_abandons_the_input():
    s = Runner(None).stream(["cat"])
    s.write("partial\n")
    s.kill()
    with pytest.raises(CommandError):
        s.wait()


def test_a_hanging_child_is_killed_after_the_timeout():
    s = Runner(None, timeout=1.0).stream(["sleep", "30"])
    for _ in range(200):
        s.write("y" * 4096)  # fills the pipe: the feeder blocks until the child is killed
    t0 = time.monotonic()
    with pytest.raises(CommandError) as err:
        s.wait()
    assert time.monotonic() - t0 < 10 and "timed out" in err.value.stderr


def test_a_missing_binary_is_a_command_error():
    s = Runner(None).stream(["/nonexistent/ipset"])
    s.write("x\n")
    with pytest.raises(CommandError) as err:
        s.wait()
    assert err.value.returncode == 127
