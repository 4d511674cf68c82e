"""The benchmark's own tools still run against the current code (they are run on demand, so
nothing else would notice them break)."""

from __future__ import annotations

import asyncio

from bench_lib import reporting_loop
from bench_lib.profiling import parse_annotate


def test_the_reporting_loop_reports_each_run_as_w3_does() -> None:
    connection = reporting_loop.InstantConnection()
    per_run_s = asyncio.run(reporting_loop.main(20, connection))
    # Run RUNNING, then RUNNING and SUCCESS for each of the three steps, then run SUCCESS.
    assert connection.events == 20 * 8
    assert per_run_s > 0


def test_the_engine_loop_runs_w3_to_success_with_three_requests_each() -> None:
    from bench_lib import engine_loop

    api = engine_loop.InstantApi()
    _, outcomes = asyncio.run(engine_loop.main(10, api))
    assert outcomes == {"SUCCESS": 10}
    assert api.requests == 30


def _round(rnd: str, contender: str, runs_per_s: float) -> dict[str, object]:
    return {
        "round": rnd,
        "contender": contender,
        "workload": "w3",
        "runs_per_s": runs_per_s,
        "cpu_ms_per_run": 1.0,
    }


def test_the_target_is_judged_only_on_a_measurement_of_its_size() -> None:
    from bench_lib import report
    from bench_lib.contenders import all_contenders

    results = [_round("1", "runner", 800), _round("1", "node-fetch", 500)]
    contenders = all_contenders([1])
    assert "| W3 | runner | node-fetch | 1.60x | 1.00x | ≥ 1.5x: met |" in report.ratios_table(
        results, contenders
    )
    short = report.ratios_table(results, contenders, judged=False)
    assert "≥ 1.5x: not judged (a short run)" in short
    assert ": met" not in short


def test_the_cores_each_contender_kept_busy_are_runs_per_s_times_cpu_per_run() -> None:
    from bench_lib import report

    results = [
        {**_round("1", "runner", 900), "cpu_ms_per_run": 1.05},
        {**_round("2", "runner", 1000), "cpu_ms_per_run": 0.99},
        {**_round("3", "runner", 500), "cpu_ms_per_run": 1.9},
        {**_round("1", "node-fetch", 700), "cpu_ms_per_run": 1.8},
        {**_round("1", "node-http", 1000)},
    ]
    line = report.cores_busy(results, ["runner", "node-fetch", "node-http", "aiohttp-raw"], "w3")
    assert line == "W3: runner 0.95, node-fetch 1.26, node-http 1.00"
    assert report.cores_busy(results, ["runner"], "w1") == ""


def test_an_interpreter_with_the_runners_packages_is_used_as_it_is() -> None:
    import json
    import sys

    from bench_lib import cli

    # The test's own interpreter has them: no venv is made for it.
    assert cli.bench_python(sys.executable) == sys.executable
    # And the header names the interpreter the contenders run on, with their package versions.
    versions = json.loads(cli._cmd([sys.executable, "-c", cli._VERSIONS]))
    assert versions["python"] == sys.version.split()[0]
    assert versions["aiohttp"] not in ("?", "not installed")


def test_callgrind_annotate_is_read_as_a_total_and_instructions_per_c_function() -> None:
    text = """--------------------------------------------------------------------------------
Ir
--------------------------------------------------------------------------------
1,751,194,250 (100.0%)  PROGRAM TOTALS

--------------------------------------------------------------------------------
Ir                    file:function
--------------------------------------------------------------------------------
432,154,500 (24.68%)  /tmp/build/Python-3.11.7/Python/ceval.c:_PyEval_EvalFrameDefault'2 [/usr/lib/libpython3.11.so.1.0]
 18,713,766 ( 1.07%)  /tmp/build/Objects/bytes_methods.c:_Py_bytes_lower [/usr/lib/libpython3.11.so.1.0]
 17,606,500 ( 1.01%)  ???:json_encode_str [/venv/site-packages/msgspec/_core.cpython-311-x86_64-linux-gnu.so]
"""
    total, functions = parse_annotate(text)

    assert total == 1_751_194_250
    assert functions == {
        "ceval.c:_PyEval_EvalFrameDefault'2 [libpython3.11.so.1.0]": 432_154_500,
        "bytes_methods.c:_Py_bytes_lower [libpython3.11.so.1.0]": 18_713_766,
        "???:json_encode_str [_core.cpython-311-x86_64-linux-gnu.so]": 17_606_500,
    }
