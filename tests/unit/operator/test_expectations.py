"""The operator's memory of its own writes (finetune_operator.expectations) and what reconciles make of it."""

from finetune_operator import handlers, kube
from finetune_operator.config import OperatorConfig
from finetune_operator.expectations import Expectations
from finetune_operator.views import JobView, PodView

CONFIG = OperatorConfig(instance="op-0")


def _body(version="7", status=None, output="s3://out/ft"):
    return {
        "metadata": {"name": "ft", "namespace": "ns", "uid": "u-1", "generation": 1, "resourceVersion": version},
        "spec": {"model": {"uri": "s3://models/m"}, "dataset": {"train": "s3://data/t"}, "output": {"uri": output}},
        "status": status or {},
    }


def test_the_version_a_patch_replaced_is_read_as_the_version_it_made():
    e = Expectations()
    e.wrote_status("u-1", "7", {"metadata": {"resourceVersion": "8"}, "status": {"phase": "Pending"}})
    fresh = e.freshest("u-1", _body("7"))
    assert fresh["metadata"]["resourceVersion"] == "8" and fresh["status"] == {"phase": "Pending"}
    assert fresh["spec"] == _body()["spec"]
    other = _body("9", {"phase": "Running"})  # someone else's newer version stays as it is
    assert e.freshest("u-1", other) is other


def test_once_the_watch_shows_the_patched_version_nothing_is_remembered():
    e = Expectations()
    e.wrote_status("u-1", "7", {"metadata": {"resourceVersion": "8"}, "status": {"phase": "Pending"}})
    e.freshest("u-1", _body("8"))
    stale = _body("7")
    assert e.freshest("u-1", stale) is stale


def test_a_created_job_is_awaited_until_the_index_shows_it_or_the_ttl_passes():
    now = [100.0]
    e = Expectations(ttl=30, clock=lambda: now[0])
    assert not e.awaiting_job("u-1", [])
    e.created_job("u-1", "ft-0")
    assert e.awaiting_job("u-1", [])
    assert not e.awaiting_job("u-1", [JobView("ft-0", 0, False, owner_uid="u-1")])
    assert not e.awaiting_job("u-1", [])  # satisfied once: a Job deleted later is the decider's to see
    e.created_job("u-1", "ft-1")
    now[0] += 31
    assert not e.awaiting_job("u-1", [])


class _Recorder:
    def __init__(self, monkeypatch):
        self.calls = []
        self.version = 7
        monkeypatch.setattr(handlers, "_progress_reader", None)
        monkeypatch.setattr(kube, "secret_keys", lambda ns, name: None)
        monkeypatch.setattr(kube, "read_meta", lambda kind, ns, name: self.calls.append(("read_meta", kind)))
        monkeypatch.setattr(kube, "create_owned", lambda obj, uid: self.calls.append(("create_owned", obj["kind"])) or True)
        monkeypatch.setattr(kube, "post_event", lambda *a, **k: self.calls.append(("post_event", a[2])))
        monkeypatch.setattr(kube, "patch_status", self.patch_status)

    def patch_status(self, ns, name, patch, version):
        if version != str(self.version):
            raise AssertionError(f"a patch against stale version {version}")
        self.calls.append(("patch_status", version))
        self.version += 1
        self.status = {**getattr(self, "status", {}), **{k: v for k, v in patch.items() if v is not None}}
        return {"metadata": {"resourceVersion": str(self.version)}, "status": self.status}


def test_events_before_the_watch_caught_up_create_nothing_twice_and_patch_nothing_stale(monkeypatch, tmp_path):
    api = _Recorder(monkeypatch)
    out = str(tmp_path)  # a local output: the progress reader reads no network
    handlers.reconcile(_body("7", output=out), jobs=[], pods=[], config=CONFIG, handler="event")
    assert [c for c in api.calls if c[0] == "create_owned"] == [("create_owned", k) for k in ("Service", "ConfigMap", "NetworkPolicy", "Job")]
    api.calls.clear()
    # the resync, with the index still at version 7 and no Job in view: left to the Job's ADDED event
    handlers.reconcile(_body("7", output=out), jobs=[], pods=[], config=CONFIG, handler="resync")
    assert api.calls == []
    # the pod's event, the FineTuneJob's own watch still behind: decided on the patched version (no 409), and
    # nothing created again
    job = JobView("ft-0", 0, False, active=1, uid="j-0", owner_uid="u-1")
    pod = PodView("ft-0-0", 0, 0, "Running", owner_uid="j-0")
    handlers.reconcile(_body("7", output=out), jobs=[job], pods=[pod], config=CONFIG, handler="pod-event")
    assert [c for c in api.calls if c[0] == "patch_status"] == [("patch_status", "8")]
    assert api.status["phase"] == "Running" and not [c for c in api.calls if c[0] in ("create_owned", "read_meta")]
