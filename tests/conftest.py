"""Fixtures shared by all tests.

``cluster``   a running :class:`finetune_devcluster.LocalCluster` for the whole session (etcd,
              kube-apiserver, controller-manager, scheduler, kwok, 2 fake nodes with 8 nvidia.com/gpu each).
              It never skips: if the binaries cannot be built or the cluster does not start, every test
              using it errors with the reason. Subprocesses must get ``env=cluster.env()`` (KUBECONFIG).
              End pods with ``cluster.pod_succeed(ns, name)`` / ``cluster.pod_fail(ns, name, code, msg)``.
              ``FINETUNE_TEST_CLUSTER=running`` reuses the cluster of ``python -m finetune_devcluster up``
              instead of starting one (fast local iteration).
``kube``      a ``kubernetes.client.ApiClient`` for it, as cluster admin.
``namespace`` a fresh namespace per test (its ``default`` ServiceAccount exists), deleted afterwards.
``s3``        a running :class:`finetune_devcluster.LocalS3` (MinIO unless ``FINETUNE_S3_BACKEND=moto``).
``kueue``     the Kueue manager (:class:`finetune_devcluster.kueue.LocalKueue`) on ``cluster``, per test module.
``mlflow_server`` a running :class:`finetune_devcluster.mlflow_server.LocalMlflow` storing its artifacts in ``s3``.

Tests using ``cluster``/``kube``/``namespace`` are marked ``cluster`` and tests using ``s3`` are marked
``s3`` automatically, so ``-m "not cluster"`` deselects them.

Tests marked ``realnode`` need a real node (kubelet + containerd, root, the locally built images:
finetune_devcluster/realnode.py). They run only with ``FINETUNE_REALNODE=1`` (``make test-realnode``);
otherwise they are *deselected* (counted as such in pytest's summary), never skipped as if they passed.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from typing import Iterator

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Also declared in pyproject.toml; repeated so the markers exist when pytest runs with another rootdir.
    for line in (
        "cluster: needs the local control plane (kube-apiserver, kwok)",
        "s3: needs the local S3 server",
        "slow: takes more than a few seconds",
        REALNODE_MARKER,
    ):
        config.addinivalue_line("markers", line)


REALNODE_MARKER = "realnode: needs a real node (kubelet + containerd, root); run only with FINETUNE_REALNODE=1"


def realnode_enabled() -> bool:
    return os.environ.get("FINETUNE_REALNODE") == "1"


_CLUSTER_FIXTURES = {"cluster", "kube", "namespace"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not realnode_enabled():
        off = [i for i in items if i.get_closest_marker("realnode")]
        if off:
            config.hook.pytest_deselected(items=off)
            items[:] = [i for i in items if not i.get_closest_marker("realnode")]
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & _CLUSTER_FIXTURES and not item.get_closest_marker("cluster"):
            item.add_marker(pytest.mark.cluster)
        if "s3" in names and not item.get_closest_marker("s3"):
            item.add_marker(pytest.mark.s3)


_BUILD_ERRORS: dict[str, Exception] = {}


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the binaries the selected tests need before any test starts, so a cold build (minutes) is
    not charged to the first test's timeout. A failure is reported by the fixtures, not here, so tests
    that need no binaries still run."""
    if session.config.option.collectonly:
        return
    need: set[str] = set()
    for item in session.items:
        names = set(getattr(item, "fixturenames", ()))
        if names & _CLUSTER_FIXTURES and os.environ.get("FINETUNE_TEST_CLUSTER") != "running":
            # helm too: the chart tests call tools.ensure("helm") inside a test
            need |= {"kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd", "kwok", "helm"}
        if "s3" in names and (os.environ.get("FINETUNE_S3_BACKEND") or "minio") == "minio":
            need.add("minio")
        if "kueue" in names:
            need.add("kueue")
    if any(item.get_closest_marker("realnode") for item in session.items):
        _prepare_realnode()
    if not need:
        return
    from finetune_devcluster import tools

    for name in sorted(need):
        try:
            tools.ensure(name)
        except tools.ToolError as e:
            _BUILD_ERRORS[name] = e


def _prepare_realnode() -> None:
    """A real node's kubelet and kube-proxy, sandbox and CoreDNS images and both project images, built before
    the first test (cold: minutes), so no test timeout covers them. Errors are raised by the fixtures."""
    from finetune_devcluster import images, tools

    for what, build in (("kubelet", lambda: tools.ensure("kubelet")), ("kube-proxy", lambda: tools.ensure("kube-proxy")),
                        ("pause-image", images.ensure_pause_archive), ("coredns-image", images.ensure_coredns_archive),
                        ("operator-image", lambda: images.build("operator")), ("trainer-image", lambda: images.build("trainer"))):
        try:
            build()
        except (tools.ToolError, images.ImageError, OSError) as e:
            _BUILD_ERRORS[what] = e


def _raise_build_errors(*names: str) -> None:
    for n in names:
        if n in _BUILD_ERRORS:
            raise RuntimeError(f"cannot build {n}: {_BUILD_ERRORS[n]}")


@pytest.fixture(scope="session")
def cluster() -> Iterator["LocalCluster"]:  # noqa: F821
    from finetune_devcluster.cluster import LocalCluster

    if os.environ.get("FINETUNE_TEST_CLUSTER") == "running":
        from finetune_devcluster.__main__ import cluster_dir

        c = LocalCluster.attach(cluster_dir())
        down = [n for n, up in c.running().items() if not up]
        if down:
            raise RuntimeError(f"FINETUNE_TEST_CLUSTER=running but {down} are not running in {c.workdir}")
        c.wait_ready(timeout=60)
        yield c
        return
    _raise_build_errors("kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd", "kwok")
    # With a real node, its pods (the operator from the chart) reach the API server through the
    # `kubernetes` Service: the API server listens beyond loopback (see realnode.py).
    c = LocalCluster(nodes=int(os.environ.get("FINETUNE_TEST_NODES", "2")),
                     apiserver_bind_address="0.0.0.0" if realnode_enabled() else "127.0.0.1")
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def kube(cluster):
    api = cluster.api_client()
    try:
        yield api
    finally:
        api.close()


def _ns_name(nodeid: str) -> str:
    base = re.sub(r"[^a-z0-9-]+", "-", nodeid.split("::")[-1].lower()).strip("-")[:40].strip("-") or "t"
    return f"{base}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def namespace(request: pytest.FixtureRequest, cluster, kube) -> Iterator[str]:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    core = client.CoreV1Api(kube)
    name = _ns_name(request.node.nodeid)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"finetune.io/test": "true"})))
    # Pods are rejected until the ServiceAccount controller has made "default" in the namespace.
    deadline = time.monotonic() + 60
    while True:
        try:
            core.read_namespaced_service_account("default", name)
            break
        except ApiException as e:
            if e.status != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    try:
        yield name
    finally:
        try:
            core.delete_namespace(name)
        except ApiException as e:
            if e.status != 404:
                raise


@pytest.fixture(scope="session")
def s3() -> Iterator["LocalS3"]:  # noqa: F821
    from finetune_devcluster.s3 import LocalS3

    _raise_build_errors("minio")
    with LocalS3() as server:
        yield server


@pytest.fixture(scope="module")
def kueue(cluster) -> Iterator["LocalKueue"]:  # noqa: F821
    """The Kueue manager on ``cluster`` (finetune_devcluster.kueue), for one test module: its webhooks
    (failurePolicy Fail, on every Job) are registered only while the module runs."""
    from finetune_devcluster.kueue import LocalKueue

    _raise_build_errors("kueue")
    with LocalKueue(cluster) as k:
        yield k
        # Workloads carry Kueue's finalizer: let Kueue release those of the tests' deleted namespaces
        # before it stops, or the namespaces stay Terminating for the rest of the session.
        left = k.wait_workloads_released(timeout=30)
        if left:
            print(f"\nWorkloads still held after 30 s: {left}")


@pytest.fixture(scope="session")
def mlflow_server(s3: "LocalS3") -> Iterator["LocalMlflow"]:  # noqa: F821
    """A real MLflow tracking server (SQLite runs and registry, artifacts in ``s3://mlflow/mlflow`` on ``s3``)."""
    from finetune_devcluster.mlflow_server import LocalMlflow

    with LocalMlflow(s3=s3) as server:
        yield server
