"""stages/errors.py: how a stage fails: one `error:` line and a non-zero exit, no traceback."""

from __future__ import annotations

import pytest

from stages.download import DownloadError, PermanentError
from stages.errors import DataError, ParamError, PipelineError, WriteError, one_line, run


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
