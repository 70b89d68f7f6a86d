"""stages/runtime/failures.py: how a stage fails: one `error:` line and a non-zero exit, no
traceback."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from stages.download import DownloadError, PermanentError
from stages.runtime.failures import (
    INTERRUPTED,
    DataError,
    ParamError,
    PipelineError,
    WriteError,
    one_line,
    run,
)
from testbed.processes import run_env
from tests.paths import ROOT
from tests.watch import Lines, start

ONE_LINE = INTERRUPTED + "\n"


def test_run_prints_one_line_and_exits_1(capsys):
    def main():
        raise DataError("first line\nsecond line\n\n  third")

    with pytest.raises(SystemExit) as info:
        run(main)
    assert info.value.code == 1
    assert capsys.readouterr().err == "error: first line; second line; third\n"


@pytest.mark.parametrize("kind", [PipelineError, ParamError, DataError, WriteError,
                                  DownloadError, PermanentError])
def test_every_user_error_kind_becomes_one_line_and_exit_1(capsys, kind):
    def main():
        raise kind(f"{kind.__name__} happened")

    with pytest.raises(SystemExit) as info:
        run(main)
    assert info.value.code == 1
    assert capsys.readouterr() == ("", f"error: {kind.__name__} happened\n")


def test_run_passes_its_arguments_and_returns_quietly(capsys):
    seen = []
    run(seen.append, ["--out", "x"])
    assert seen == [["--out", "x"]]
    assert capsys.readouterr() == ("", "")


def test_a_bug_is_not_disguised_as_a_user_error(capsys):
    """Anything that is not a PipelineError is a bug: it keeps its traceback."""
    def main():
        raise ZeroDivisionError("bug")

    with pytest.raises(ZeroDivisionError):
        run(main)
    assert capsys.readouterr().err == ""


def test_run_turns_ctrl_c_into_exit_130(capsys):
    def main():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as info:
        run(main)
    assert info.value.code == 130
    assert capsys.readouterr().err == "error: interrupted; no output was replaced\n"


def test_one_line_joins_the_non_blank_lines_of_a_message():
    assert one_line(ValueError("  a\n\n b \nc")) == "a; b; c"
    assert one_line(ValueError("")) == ""


# --- deferred interrupts: real signals to a small child process ---------------------

DEFERRING = textwrap.dedent("""
    import sys, time
    from stages.runtime.failures import deferred_interrupts, run, stop_if_interrupted

    def main():
        with deferred_interrupts():
            print("ready", flush=True)
            while True:
                busy = time.perf_counter() + 0.02
                while time.perf_counter() < busy:  # a stretch with no stopping point
                    pass
                print("step", flush=True)
                if sys.argv[1] == "stops":
                    stop_if_interrupted()

    run(main)
""")


def deferring_child(mode: str) -> tuple[subprocess.Popen, Lines]:
    env = run_env()
    env["PYTHONPATH"] = str(ROOT)
    return start(ROOT, sys.executable, "-c", DEFERRING, mode, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_deferred_signal_stops_at_the_next_stopping_point(sig, code):
    proc, lines = deferring_child("stops")
    lines.wait_for("ready")
    proc.send_signal(sig)
    assert proc.wait(timeout=30) == code
    assert proc.stderr.read() == ONE_LINE
    assert lines.rest().splitlines()[-1] == "step"  # it stopped after a step, not inside


@pytest.mark.slow
def test_without_a_stopping_point_ctrl_c_waits_and_a_second_one_ends_it_at_once():
    proc, lines = deferring_child("never")
    lines.wait_for("step")
    proc.send_signal(signal.SIGINT)
    for _ in range(3):  # the first Ctrl-C only took note: the work goes on
        lines.wait_for("step", timeout=30)
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    assert proc.stderr.read() == ONE_LINE


def test_run_exits_128_plus_the_number_of_a_deferred_signal(capsys):
    from stages.runtime.failures import Interrupted

    def main():
        raise Interrupted(signal.SIGTERM)

    with pytest.raises(SystemExit) as info:
        run(main)
    assert info.value.code == 128 + signal.SIGTERM == 143
    assert capsys.readouterr().err == ONE_LINE
