"""bench/operator_scale.py: API requests are counted per job from the audit log, by client and call."""

from __future__ import annotations

import json

import operator_scale as bench


def _event(verb, resource, agent, ns="bench-operator", stage="ResponseComplete", sub=None, ms=20):
    ref = {"resource": resource, "namespace": ns, **({"subresource": sub} if sub else {})}
    return {"stage": stage, "verb": verb, "objectRef": ref, "userAgent": agent,
            "requestReceivedTimestamp": "2026-12-03T10:00:00.000000Z", "stageTimestamp": f"2026-12-03T10:00:00.{ms:03d}000Z"}


def test_requests_are_counted_once_per_request_and_split_by_client(tmp_path):
    log = tmp_path / "audit.log"
    events = [
        _event("create", "jobs", "OpenAPI-Generator/36.0.3/python"),
        _event("create", "jobs", "OpenAPI-Generator/36.0.3/python", stage="RequestReceived"),  # not a second request
        _event("patch", "finetunejobs", "OpenAPI-Generator/36.0.3/python", sub="status", ms=40),
        _event("patch", "finetunejobs", "OpenAPI-Generator/36.0.3/python", sub="status", ms=60),
        _event("create", "pods", "kube-controller-manager/v1.33.13"),
        _event("create", "finetunejobs", bench.BENCH_AGENT),
        _event("create", "jobs", "OpenAPI-Generator/36.0.3/python", ns="bench-baseline"),
    ]
    log.write_text("\n".join(json.dumps(e) for e in events) + "\nnot json\n")
    counts = bench.count_requests(log, "bench-operator", jobs=2)
    assert counts["operator_per_job"] == 1.5  # 3 operator requests for 2 jobs
    assert counts["operator_by_call_per_job"] == {"patch finetunejobs/status": 1.0, "create jobs": 0.5}
    assert counts["all_clients_per_job"] == 2.5
    assert counts["operator_server_ms_p50"]["patch finetunejobs/status"] in (40.0, 60.0)
