"""Small helpers for tests that talk to the local control plane through kubectl."""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any, Callable


class Kubectl:
    def __init__(self, kubeconfig: str, env: dict[str, str] | None = None):
        self.env = {**(env or os.environ), "KUBECONFIG": kubeconfig}

    def run(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(["kubectl", *args], input=input, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def apply(self, manifest: dict[str, Any] | str, *extra: str) -> subprocess.CompletedProcess:
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        return self.run("apply", "-f", "-", *extra, input=text)

    def create(self, manifest: dict[str, Any], check: bool = True) -> subprocess.CompletedProcess:
        return self.run("create", "-f", "-", input=json.dumps(manifest), check=check)

    def get(self, kind: str, name: str | None = None, namespace: str | None = None, selector: str | None = None) -> Any:
        args = ["get", kind] + ([name] if name else [])
        if namespace:
            args += ["-n", namespace]
        if selector:
            args += ["-l", selector]
        proc = self.run(*args, "-o", "json", check=False)
        if proc.returncode != 0:
            if "NotFound" in proc.stderr:
                return None
            raise AssertionError(proc.stderr)
        return json.loads(proc.stdout)

    def items(self, kind: str, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        return (self.get(kind, namespace=namespace, selector=selector) or {}).get("items", [])


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 60, interval: float = 0.5) -> Any:
    """Poll until fn() returns something truthy; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except AssertionError as exc:  # transient kubectl failures while objects settle
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last seen: {last!r}")
