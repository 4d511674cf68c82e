"""Workflow definitions the tests share, built as the control plane would send them."""

from __future__ import annotations

from typing import Any


def api_key_connection(
    base_url: str, cid: str = "conn_api", key: str | None = None
) -> dict[str, Any]:
    conn: dict[str, Any] = {
        "id": cid,
        "type": "API_KEY",
        "config": {"baseUrl": base_url, "apiKeyName": "X-API-Key", "apiKeyIn": "header"},
    }
    if key is not None:
        conn["secrets"] = {"apiKey": key}
    return conn


def three_step_version(base_url: str, version_id: str = "wfv_3step") -> dict[str, Any]:
    """GET a customer, POST a ticket templated from it, GET the ticket back."""
    return {
        "id": version_id,
        "workflowId": "wf_tickets",
        "version": 1,
        "parameterSchema": {"type": "object", "required": ["customerId"]},
        "envConfig": {"vars": {"REGION": "eu"}},
        "timeoutMs": 60_000,
        "graph": {
            "steps": [
                {
                    "key": "fetch_customer",
                    "actionId": "act_get_customer",
                    "connectionId": "conn_api",
                    "input": {"path": {"customerId": "{{ input.customerId }}"}},
                    "extract": {"email": "$.body.email"},
                },
                {
                    "key": "create_ticket",
                    "actionId": "act_create_ticket",
                    "connectionId": "conn_api",
                    "input": {
                        "body": {
                            "requester": "{{ steps.fetch_customer.output.email }}",
                            "region": "{{ env.REGION }}",
                            "subject": "Order {{ input.orderNo }} for {{ steps.fetch_customer.output.body.name }}",
                            "priority": "{{ input.priority }}",
                        }
                    },
                },
                {
                    "key": "get_ticket",
                    "actionId": "act_get_ticket",
                    "connectionId": "conn_api",
                    "input": {"path": {"ticketId": "{{ steps.create_ticket.output.body.id }}"}},
                },
            ]
        },
        "actions": {
            "act_get_customer": {
                "id": "act_get_customer",
                "name": "Get customer",
                "method": "GET",
                "endpointTemplate": "/customers/{customerId}",
                "timeoutMs": 5000,
            },
            "act_create_ticket": {
                "id": "act_create_ticket",
                "name": "Create ticket",
                "method": "POST",
                "endpointTemplate": "/tickets",
                "headersTemplate": {"X-Region": "{{ env.REGION }}"},
                "idempotencyHeader": "Idempotency-Key",
                "timeoutMs": 5000,
            },
            "act_get_ticket": {
                "id": "act_get_ticket",
                "name": "Get ticket",
                "method": "GET",
                "endpointTemplate": "/tickets/{ticketId}",
                "timeoutMs": 5000,
            },
        },
        "connections": {"conn_api": api_key_connection(base_url)},
    }


def job_data(
    run_id: str, version: dict[str, Any] | None, *, version_id: str | None = None, **extra: Any
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "workflowRunId": run_id,
        "workflowVersionId": version_id or (version["id"] if version else "wfv_missing"),
        "tenantId": "ten_acme",
        "input": {"customerId": "c 42/é?#", "orderNo": 7, "priority": 2},
    }
    if version is not None:
        data["workflowVersion"] = version
    data.update(extra)
    return data
