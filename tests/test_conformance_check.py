"""conformance/check.py, CI's judge of the Autobahn|Testsuite report: what passes."""

from __future__ import annotations

import importlib.util
import io
import json
from types import ModuleType

import pytest

from helpers import REPO


def load_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check", REPO / "conformance" / "check.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = load_check()


def case(behavior: str, close: str = "OK") -> dict[str, str]:
    return {"behavior": behavior, "behaviorClose": close, "duration": "2"}


@pytest.mark.parametrize("case_id, behavior, close, failed", [
    ("1.1.1", "OK", "OK", False),
    ("6.4.1", "NON-STRICT", "OK", False),
    ("7.1.6", "INFORMATIONAL", "INFORMATIONAL", False),
    ("12.1.1", "UNIMPLEMENTED", "OK", False),  # permessage-deflate, not offered
    ("13.7.18", "UNIMPLEMENTED", "OK", False),
    ("7.5.1", "OK", "FAILED BY CLIENT", True),  # the server neither answered nor closed
    ("7.9.1", "OK", "WRONG CODE", True),
    ("5.1", "OK", "UNCLEAN", True),
    ("3.1", "FAILED", "OK", True),
    ("2.1", "UNIMPLEMENTED", "OK", True),  # unimplemented outside 12.x/13.x
    ("12.1.2", "UNIMPLEMENTED", "FAILED BY CLIENT", True),
    ("12.1.3", "OK", "UNIMPLEMENTED", True),
    ("1.1.2", "OK", "NON-STRICT", True),
])
def test_a_case_passes_only_on_accepted_behavior_and_closing_behavior(case_id, behavior,
                                                                      close, failed):
    assert check.is_failed(case_id, case(behavior, close)) is failed


def test_the_exit_status_and_summary_name_every_failed_case(tmp_path, capsys):
    index = {"ebbcast": {"1.1.1": case("OK"), "7.5.1": case("OK", "FAILED BY CLIENT"),
                         "7.9.10": case("FAILED"), "12.1.1": case("UNIMPLEMENTED")}}
    (tmp_path / "index.json").write_text(json.dumps(index))
    assert check.main([str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "  FAILED cases: 7.5.1 7.9.10\n" in out
    assert "  failed (behavior or behaviorClose): 2\n" in out
    assert err == "check.py: 2 case(s) FAILED\n"
    passing = {"ebbcast": {"1.1.1": case("OK"), "12.1.1": case("UNIMPLEMENTED")}}
    (tmp_path / "index.json").write_text(json.dumps(passing))
    assert check.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.endswith("check.py: no failed case (2 checked)\n")


def test_a_missing_or_empty_report_is_exit_2(tmp_path):
    assert check.main([str(tmp_path)]) == 2
    (tmp_path / "index.json").write_text(json.dumps({}))
    assert check.main([str(tmp_path)]) == 2
    summary = io.StringIO()
    assert check.summarize("ebbcast", {"1.1.1": case("OK")}, tmp_path, summary) == []
