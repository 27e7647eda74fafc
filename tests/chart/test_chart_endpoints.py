"""The chart's endpoint allow-list and progress-read bounds reach the operator as the settings
:class:`finetune_operator.config.OperatorConfig` reads, and bad entries fail at ``helm template``."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_operator.config import OperatorConfig
from finetune_operator.progress import endpoint_allowed
from test_chart import env_of, helm, render, render_raw  # noqa: F401  (helm is a fixture)


def test_defaults_allow_any_endpoint_with_the_documented_bounds(helm: str) -> None:
    env = env_of(render(helm))
    assert "FINETUNE_ALLOWED_ENDPOINTS" not in env
    assert env["FINETUNE_PROGRESS_DEADLINE_SECONDS"] == "5" and env["FINETUNE_PROGRESS_MAX_BYTES"] == "1048576"
    config = OperatorConfig.from_env(env)
    assert config.allowed_endpoints == () and endpoint_allowed("http://anything:1", config.allowed_endpoints)
    assert (config.progress_deadline_seconds, config.progress_max_bytes) == (5.0, 1 << 20)


def test_the_allow_list_flows_into_the_operator_config(helm: str) -> None:
    values = {"storage": {"allowedEndpoints": ["http://minio.storage:9000", "https://*.s3.example.com", "aws"]},
              "progress": {"deadlineSeconds": 2.5, "maxBytes": 65536}}
    env = env_of(render(helm, values))
    config = OperatorConfig.from_env(env)
    assert config.allowed_endpoints == ("http://minio.storage:9000", "https://*.s3.example.com", "aws")
    assert (config.progress_deadline_seconds, config.progress_max_bytes) == (2.5, 65536)
    assert endpoint_allowed("https://eu.s3.example.com", config.allowed_endpoints)
    assert not endpoint_allowed("http://169.254.169.254", config.allowed_endpoints)


@pytest.mark.parametrize("values,message", [
    ({"storage": {"allowedEndpoints": ["minio:9000"]}}, "/storage/allowedEndpoints/0"),
    ({"storage": {"allowedEndpoints": ["http://minio:9000/bucket"]}}, "/storage/allowedEndpoints/0"),
    ({"storage": {"allowedEndpoint": []}}, "allowedEndpoint"),
    ({"progress": {"deadlineSeconds": 0}}, "/progress/deadlineSeconds"),
    ({"progress": {"maxBytes": 10}}, "/progress/maxBytes"),
])
def test_schema_rejects_bad_endpoint_settings(helm: str, values: dict[str, Any], message: str) -> None:
    proc = render_raw(helm, values)
    assert proc.returncode != 0 and "schema" in proc.stderr and message in proc.stderr, proc.stderr
