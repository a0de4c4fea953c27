"""Count what the reliability suite tried and how medembed answered: `python -m tests.reliability.summary`.

Runs `pytest tests/reliability` once (with a JUnit XML report and the ledger `test_faults.py` writes, see
MEDEMBED_RELIABILITY_LEDGER) and prints:

  inputs tried        bad or awkward files of the corpus, bad manifest rows, a non-UTF-8 CSV, injected faults
  one-line errors     bad inputs and faults answered by one line naming the file (or row) and the problem
  tracebacks          in any `medembed` output the suite checks (target 0)
  silently wrong      rows a reader gets with other values than an uninterrupted run's, undetected (target 0)
  rows lost           rows acknowledged before a fault, or of the uninterrupted run, missing after the rerun (target 0)

Figures only come from this run: a test that fails or is skipped is shown as such, never counted as a success.
`--json` prints the counts as JSON. The exit code is pytest's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def _outcomes(junit: Path) -> dict[str, str]:
    """test name -> passed | failed | skipped | xfailed, from a pytest JUnit XML report."""
    outcomes = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped":
                outcome = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
        outcomes[name] = outcome
    return outcomes


def _corpus_cases():
    sys.path.insert(0, str(REPO))
    from tests.reliability.generators import BAD_ROWS, write_corpus

    with tempfile.TemporaryDirectory() as folder:
        return write_corpus(Path(folder)), BAD_ROWS


def count(outcomes: dict[str, str], ledger: list[dict]) -> dict:
    cases, bad_rows = _corpus_cases()
    bad_files = [c for c in cases if not c.good]

    def passed(test: str) -> bool:
        return any(outcome == "passed" for name, outcome in outcomes.items() if name.split("::", 1)[1].startswith(test))

    # A bad file counts as a one-line error where the library test (decode and load: one-line reason of its
    # kind) and the extract test through the CLI (in the failed table with the reason, or reported missing) pass.
    files_ok = sum(
        passed(f"test_decode_and_load_answer_pixels_or_a_named_reason[{c.path}]") for c in bad_files
    ) if passed("test_extract_embeds_the_good_and_lists_the_bad") else 0
    rows_ok = len(bad_rows) if passed("test_bad_rows_are_named_with_their_problem") else 0
    csv_ok = 1 if passed("test_a_csv_that_is_not_utf8_is_one_line_naming_the_line") else 0

    calls = [e for e in ledger if e["what"] == "call"]
    faults = sorted({e["case"] for e in calls} - {"uninterrupted"})
    failing_calls = [e for e in calls if e["expected_rc"] != 0]
    fault_ok = sum(bool(e["one_line_error"]) and e["rc"] == e["expected_rc"] for e in failing_calls)
    data = [e for e in ledger if e["what"] == "data"]
    traceback_tests = [n for n, o in outcomes.items() if "traceback" in n and o == "failed"]
    return {
        "tests": dict(Counter(outcomes.values())),
        "inputs_tried": {
            "corpus files (bad)": f"{len(cases)} ({len(bad_files)})",
            "bad manifest rows": len(bad_rows),
            "non-UTF-8 manifest": 1,
            "injected faults": len(faults),
        },
        "expected_errors": len(bad_files) + len(bad_rows) + 1 + len(failing_calls),
        "one_line_errors": files_ok + rows_ok + csv_ok + fault_ok,
        "fault_calls_without_one_line_error": [f"{e['case']}: {e['command']} exit {e['rc']}" for e in failing_calls if not e["one_line_error"]],
        "medembed_calls_in_fault_tests": len(calls),
        "tracebacks": sum(e["traceback"] for e in calls) + len(traceback_tests),
        "silently_wrong_rows": sum(e["silently_wrong"] for e in data),
        "rows_lost": sum(e["rows_lost"] for e in data),
        "faults_checked_against_uninterrupted_run": sorted({e["case"] for e in data if e.get("compared", True)}),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        junit, ledger_path = Path(folder) / "junit.xml", Path(folder) / "ledger.jsonl"
        env = {**os.environ, "MEDEMBED_RELIABILITY_LEDGER": str(ledger_path)}
        start = time.perf_counter()
        rc = subprocess.call(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", str(HERE)],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL if args.json else None,
        )
        seconds = time.perf_counter() - start
        ledger = [json.loads(line) for line in ledger_path.read_text().splitlines()] if ledger_path.exists() else []
        counts = count(_outcomes(junit), ledger) | {"seconds": round(seconds, 1)}
    if args.json:
        print(json.dumps(counts, indent=2))
    else:
        print()
        print(f"reliability suite: {', '.join(f'{n} {k}' for k, n in sorted(counts['tests'].items()))} in {counts['seconds']} s")
        for key, value in counts["inputs_tried"].items():
            print(f"  tried             {key}: {value}")
        print(f"  one-line errors   {counts['one_line_errors']} of {counts['expected_errors']} expected errors")
        for line in counts["fault_calls_without_one_line_error"]:
            print(f"    without one:    {line}")
        print(f"  tracebacks        {counts['tracebacks']}")
        print(f"  silently wrong    {counts['silently_wrong_rows']} rows")
        print(f"  rows lost         {counts['rows_lost']} ({', '.join(counts['faults_checked_against_uninterrupted_run'])} compared with an uninterrupted run)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
