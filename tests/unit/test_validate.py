"""``python -m runner validate FILE``: a catalogue of broken definitions, each with the exact
lines it prints; a good one that passes; stdin; usage errors; the real CLI as a subprocess."""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from runner.validate import main, validate_source

REPO = Path(__file__).resolve().parents[2]

GOOD: dict[str, Any] = {
    "id": "wfv_12",
    "workflowId": "wf_3",
    "version": 12,
    "parameterSchema": {
        "type": "object",
        "required": ["customerId"],
        "properties": {"customerId": {"type": "string"}, "priority": {"type": "integer"}},
    },
    "envConfig": {"vars": {"REGION": "eu"}, "secretRefs": {"SIGNING_KEY": "sec_77"}},
    "graph": {
        "steps": [
            {
                "key": "fetch_customer",
                "actionId": "act_get_customer",
                "connectionId": "conn_crm",
                "input": {"path": {"customerId": "{{ input.customerId }}"}},
                "extract": {"email": "$.body.email"},
            },
            {
                "key": "create_ticket",
                "actionId": "act_create_ticket",
                "connectionId": "conn_crm",
                "input": {
                    "headers": {"X-Signature": "{{ secrets.SIGNING_KEY }}"},
                    "body": {
                        "requester": "{{ steps.fetch_customer.output.email }}",
                        "region": "{{ env.REGION }}",
                        "note": "run {{ run.id }} for {{ run.tenantId }}",
                        "priority": "{{ input.priority }}",
                    },
                },
            },
            {
                "key": "get_ticket",
                "actionId": "act_get_ticket",
                "connectionId": "conn_crm",
                # fetch_customer is upstream through create_ticket: transitive dependencies count.
                "when": "{{ steps.fetch_customer.status }}",
                "input": {"path": {"ticketId": "{{ steps.create_ticket.output.body.id }}"}},
            },
        ]
    },
    "actions": {
        "act_get_customer": {
            "id": "act_get_customer",
            "endpointTemplate": "/customers/{customerId}",
            "pathSchema": {
                "type": "object",
                "required": ["customerId"],
                "properties": {"customerId": {"type": "string"}},
            },
        },
        "act_create_ticket": {
            "id": "act_create_ticket",
            "method": "POST",
            "endpointTemplate": "/tickets",
            "headersTemplate": {"X-Region": "{{ env.REGION }}"},
            "bodySchema": {"type": "object", "properties": {"priority": {"type": "integer"}}},
        },
        "act_get_ticket": {
            "id": "act_get_ticket",
            "endpointTemplate": "/tickets/{ticketId}",
            "outputSchema": {"type": "object", "required": ["id"]},
        },
    },
    "connections": {
        "conn_crm": {
            "id": "conn_crm",
            "type": "API_KEY",
            "config": {"baseUrl": "https://crm.example"},
        }
    },
}


def broken(change: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    doc = copy.deepcopy(GOOD)
    change(doc)
    return doc


def step(doc: dict[str, Any], i: int) -> dict[str, Any]:
    step_doc: dict[str, Any] = doc["graph"]["steps"][i]
    return step_doc


def run_main(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> tuple[int, list[str]]:
    path = tmp_path / "definition.json"
    path.write_text(text)
    code = main([str(path)])
    out = capsys.readouterr().out
    return code, out.splitlines()


CATALOGUE: list[tuple[str, dict[str, Any], list[str]]] = [
    (
        "cycle",
        broken(lambda d: step(d, 0).update(dependsOn=["get_ticket"])),
        [
            "$.graph.steps: dependency cycle create_ticket -> fetch_customer -> get_ticket "
            "-> create_ticket"
        ],
    ),
    (
        "duplicate key",
        broken(
            lambda d: d["graph"]["steps"].append({**step(d, 2), "dependsOn": ["create_ticket"]})
        ),
        ["$.graph.steps[3].key: duplicate key 'get_ticket' (also $.graph.steps[2])"],
    ),
    (
        "unknown dependency",
        broken(lambda d: step(d, 2).update(dependsOn=["create_ticket", "nope"])),
        ["$.graph.steps[2].dependsOn: unknown step 'nope'"],
    ),
    (
        "step depends on itself",
        broken(lambda d: step(d, 0).update(dependsOn=["fetch_customer"])),
        ["$.graph.steps[0].dependsOn: step 'fetch_customer' depends on itself"],
    ),
    (
        "unknown action",
        broken(lambda d: step(d, 1).update(actionId="act_nope")),
        ["$.graph.steps[1].actionId: unknown action 'act_nope'"],
    ),
    (
        "unknown connection",
        broken(lambda d: step(d, 1).update(connectionId="conn_nope")),
        ["$.graph.steps[1].connectionId: unknown connection 'conn_nope'"],
    ),
    (
        "reference to a step that does not exist",
        broken(lambda d: step(d, 1)["input"]["body"].update(requester="{{ steps.nope.output.x }}")),
        [
            "$.graph.steps[1].input.body.requester: '{{ steps.nope.output.x }}' refers to step "
            "'nope', which is not upstream of 'create_ticket' (there is no such step)"
        ],
    ),
    (
        "reference to a step that is not upstream",
        broken(
            lambda d: step(d, 2).update(
                dependsOn=[], when="{{ steps.create_ticket.output.body.open }}"
            )
        ),
        [
            "$.graph.steps[2].when: '{{ steps.create_ticket.output.body.open }}' refers to "
            "step 'create_ticket', which is not upstream of 'get_ticket'",
            "$.graph.steps[2].input.path.ticketId: '{{ steps.create_ticket.output.body.id }}' "
            "refers to step 'create_ticket', which is not upstream of 'get_ticket'",
        ],
    ),
    (
        "reference to a step's own output",
        broken(
            lambda d: step(d, 0)["input"]["path"].update(
                customerId="{{ steps.fetch_customer.output.id }}"
            )
        ),
        [
            "$.graph.steps[0].input.path.customerId: '{{ steps.fetch_customer.output.id }}' "
            "refers to step 'fetch_customer', which is not upstream of 'fetch_customer'"
        ],
    ),
    (
        "reference past a step's output or status",
        broken(
            lambda d: step(d, 1)["input"]["body"].update(
                requester="{{ steps.fetch_customer.body }}"
            )
        ),
        [
            "$.graph.steps[1].input.body.requester: '{{ steps.fetch_customer.body }}' must go on "
            "with .output or .status after 'steps.fetch_customer'"
        ],
    ),
    (
        "reference to an undeclared input field",
        broken(lambda d: step(d, 0)["input"]["path"].update(customerId="{{ input.custId }}")),
        [
            "$.graph.steps[0].input.path.customerId: '{{ input.custId }}' refers to input field "
            "'custId', which $.parameterSchema does not declare"
        ],
    ),
    (
        "undeclared env var, in an action's headers",
        broken(
            lambda d: d["actions"]["act_create_ticket"].update(
                headersTemplate={"X-Zone": "{{ env.ZONE }}"}
            )
        ),
        [
            "$.actions.act_create_ticket.headersTemplate.X-Zone: '{{ env.ZONE }}' refers to env "
            "var 'ZONE', which $.envConfig.vars does not declare"
        ],
    ),
    (
        "undeclared secret",
        broken(
            lambda d: step(d, 1)["input"]["headers"].update({"X-Signature": "k={{ secrets.KEY }}"})
        ),
        [
            "$.graph.steps[1].input.headers.X-Signature: '{{ secrets.KEY }}' refers to secret "
            "'KEY', which $.envConfig.secretRefs does not declare"
        ],
    ),
    (
        "run field that does not exist",
        broken(lambda d: step(d, 1)["input"]["body"].update(note="{{ run.workflowId }}")),
        ["$.graph.steps[1].input.body.note: '{{ run.workflowId }}' must be run.id or run.tenantId"],
    ),
    (
        "template that does not parse",
        broken(
            lambda d: step(d, 1)["input"]["body"].update(
                note="{{ config.x }}", region="{{ env.REGION[ }}"
            )
        ),
        [
            "$.graph.steps[1].input.body.region: cannot parse '{{ env.REGION[ }}' at '['",
            "$.graph.steps[1].input.body.note: '{{ config.x }}' must start with one of env, "
            "input, run, secrets, steps",
        ],
    ),
    (
        "extract that does not parse",
        broken(lambda d: step(d, 0).update(extract={"email": "body.email"})),
        ["$.graph.steps[0].extract.email: JSONPath 'body.email' must start with '$'"],
    ),
    (
        "schema that does not compile",
        broken(lambda d: d["actions"]["act_create_ticket"].update(bodySchema={"type": "strin"})),
        ["$.actions.act_create_ticket.bodySchema: does not compile: Unknown type"],
    ),
    (
        "parameter schema with a remote ref",
        broken(lambda d: d.update(parameterSchema={"$ref": "https://schemas.example/p.json"})),
        [
            "$.parameterSchema: does not compile: $ref 'https://schemas.example/p.json' leaves "
            "the schema; only local refs (#/...) are allowed"
        ],
    ),
    (
        "path parameters that do not match the endpoint template",
        broken(
            lambda d: d["actions"]["act_get_customer"].update(endpointTemplate="/customers/{id}")
        ),
        [
            "$.graph.steps[0].input.path: missing path parameter 'id' of '/customers/{id}'",
            "$.graph.steps[0].input.path.customerId: 'customerId' is not a parameter of "
            "'/customers/{id}'",
            "$.actions.act_get_customer.pathSchema.required: 'customerId' is not a parameter of "
            "'/customers/{id}'",
            "$.actions.act_get_customer.pathSchema.required: path parameter 'id' of "
            "'/customers/{id}' is not required",
        ],
    ),
    (
        "absolute endpoint under a connection",
        broken(
            lambda d: d["actions"]["act_get_ticket"].update(
                endpointTemplate="https://x.example/t/{ticketId}"
            )
        ),
        ["$.actions.act_get_ticket: endpointTemplate must be relative to the connection's baseUrl"],
    ),
    (
        "a password in a connection's baseUrl",
        broken(
            lambda d: d["connections"]["conn_crm"]["config"].update(
                baseUrl="https://svc:pw-123@crm.example"
            )
        ),
        [
            "$.connections.conn_crm.config: baseUrl may not carry a user or password "
            "(user:password@): use a BASIC connection"
        ],
    ),
    (
        "timeout of zero",
        broken(lambda d: step(d, 2).update(timeoutMs=0)),
        ["$.graph.steps[2].timeoutMs: must be above 0"],
    ),
    (
        "a definition that does not decode",
        broken(lambda d: step(d, 1).update(dependson=["fetch_customer"])),
        ["$.graph.steps[1]: object contains unknown field dependson"],
    ),
    (
        "several parts that do not decode",
        broken(
            lambda d: (
                d.update(timeoutMs="soon"),
                step(d, 1).update(dependson=["fetch_customer"]),
                step(d, 2).update(key=3),
                d["actions"]["act_get_ticket"].pop("endpointTemplate"),
            )
        ),
        [
            "$.timeoutMs: expected int, got str",
            "$.graph.steps[1]: object contains unknown field dependson",
            "$.graph.steps[2].key: expected str, got int",
            "$.actions.act_get_ticket: object missing required field endpointTemplate",
        ],
    ),
    (
        "several structural problems at once",
        broken(
            lambda d: (
                step(d, 0).update(key="fetch-customer"),
                step(d, 1).update(actionId="act_nope"),
                step(d, 2).update(dependsOn=["nope"]),
                d["envConfig"].update(vars={}),
            )
        ),
        [
            "$.graph.steps[0].key: 'fetch-customer' must match [A-Za-z_][A-Za-z0-9_]*",
            "$.graph.steps[1].actionId: unknown action 'act_nope'",
            "$.graph.steps[2].dependsOn: unknown step 'nope'",
            "$.graph.steps[1].input.body.requester: '{{ steps.fetch_customer.output.email }}' "
            "refers to step 'fetch_customer', which is not upstream of 'create_ticket' "
            "(there is no such step)",
            "$.graph.steps[1].input.body.region: '{{ env.REGION }}' refers to env var 'REGION', "
            "which $.envConfig.vars does not declare",
            "$.graph.steps[2].when: '{{ steps.fetch_customer.status }}' refers to step "
            "'fetch_customer', which is not upstream of 'get_ticket' (there is no such step)",
            "$.graph.steps[2].input.path.ticketId: '{{ steps.create_ticket.output.body.id }}' "
            "refers to step 'create_ticket', which is not upstream of 'get_ticket'",
        ],
    ),
    (
        "paginate incomplete for its mode",
        broken(lambda d: d["actions"]["act_get_customer"].update(paginate={"mode": "cursor"})),
        ["$.actions.act_get_customer.paginate.cursorPath: required in mode cursor"],
    ),
    (
        "paginate overridden by a step with a bad cap and path",
        broken(
            lambda d: (
                d["actions"]["act_get_customer"].update(paginate={"mode": "page"}),
                step(d, 0).update(paginate={"maxPages": 0}),
                step(d, 2).update(paginate={"mode": "offset", "items": "rows"}),
            )
        ),
        [
            "$.graph.steps[0].paginate.maxPages: must be at least 1",
            "$.graph.steps[2].paginate.items: JSONPath 'rows' must start with '$'",
        ],
    ),
    (
        "paginate field misspelt",
        broken(lambda d: step(d, 0).update(paginate={"mode": "page", "maxpages": 3})),
        ["$.graph.steps[0].paginate: object contains unknown field maxpages"],
    ),
]


def test_a_paginated_definition_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = broken(
        lambda d: (
            d["actions"]["act_get_customer"].update(
                paginate={"mode": "cursor", "items": "$.data[*]", "cursorPath": "$.next"}
            ),
            step(d, 0).update(paginate={"maxPages": 3, "onLimit": "FAIL"}),
        )
    )
    assert run_main(tmp_path, capsys, json.dumps(doc)) == (0, ["ok: 3 steps"])


@pytest.mark.parametrize(
    ("doc", "expected"),
    [(doc, lines) for _, doc, lines in CATALOGUE],
    ids=[c[0] for c in CATALOGUE],
)
def test_broken_definition_prints_each_problem_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], doc: dict[str, Any], expected: list[str]
) -> None:
    code, lines = run_main(tmp_path, capsys, json.dumps(doc))
    assert (code, lines) == (1, expected)


def test_good_definition_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(tmp_path, capsys, json.dumps(GOOD)) == (0, ["ok: 3 steps"])


def test_invalid_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = run_main(tmp_path, capsys, '{"id": "wfv_1",')
    assert code == 1
    assert lines == ["$: not valid JSON (Input data was truncated)"]


def test_not_an_object(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(tmp_path, capsys, "[]") == (1, ["$: expected object, got array"])


def test_input_is_lenient_when_the_schema_declares_no_properties() -> None:
    doc = broken(lambda d: d.update(parameterSchema={"type": "object", "required": ["customerId"]}))
    step(doc, 1)["input"]["body"]["extra"] = "{{ input.orderNo }}"
    assert validate_source(json.dumps(doc)).problems == ()
    doc["parameterSchema"] = {"properties": {"customerId": {}}, "additionalProperties": True}
    assert validate_source(json.dumps(doc)).problems == ()
    doc["parameterSchema"] = {"properties": {"customerId": {}, "priority": {}}}
    assert validate_source(json.dumps(doc)).problems == (
        "$.graph.steps[1].input.body.extra: '{{ input.orderNo }}' refers to input field "
        "'orderNo', which $.parameterSchema does not declare",
    )


def test_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(json.dumps(GOOD).encode())))
    assert main(["-"]) == 0
    assert capsys.readouterr().out == "ok: 3 steps\n"


@pytest.mark.parametrize("argv", [[], ["a.json", "b.json"]])
def test_usage_error_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("usage: python -m runner validate FILE")


def test_unreadable_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.json"
    assert main([str(missing)]) == 2
    assert (
        capsys.readouterr().err == f"validate: cannot read {missing}: No such file or directory\n"
    )


# --- the real CLI -----------------------------------------------------------------------------


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runner", "validate", *args],
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_good_file(tmp_path: Path) -> None:
    path = tmp_path / "good.json"
    path.write_text(json.dumps(GOOD))
    done = cli(str(path))
    assert (done.returncode, done.stdout, done.stderr) == (0, "ok: 3 steps\n", "")


def test_cli_broken_definition_on_stdin() -> None:
    doc = broken(
        lambda d: step(d, 1)["input"]["body"].update(requester="{{ steps.nope.output.x }}")
    )
    done = cli("-", stdin=json.dumps(doc))
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        "$.graph.steps[1].input.body.requester: '{{ steps.nope.output.x }}' refers to step "
        "'nope', which is not upstream of 'create_ticket' (there is no such step)"
    ]


def test_cli_without_a_file() -> None:
    done = cli()
    assert done.returncode == 2
    assert "usage: python -m runner validate FILE" in done.stderr
