"""Children are ours by uid: the views carry their controller's uid and owned() keeps only ours."""

from finetune_operator.views import JobView, PodView, foreign_owner, job_view, owned, pod_view


def ref(uid, kind="FineTuneJob", name="ft"):
    return {"apiVersion": "x/v1", "kind": kind, "name": name, "uid": uid, "controller": True}


def test_views_carry_the_controller_uid():
    job = job_view({"metadata": {"name": "ft-0", "uid": "j-0", "labels": {"finetune.io/attempt": "0"},
                                 "ownerReferences": [{"kind": "X", "uid": "not-controller"}, ref("u-1")]}})
    assert (job.uid, job.owner_uid) == ("j-0", "u-1")
    pod = pod_view({"metadata": {"name": "ft-0-0-abc", "ownerReferences": [ref("j-0", "Job", "ft-0")]}})
    assert pod.owner_uid == "j-0"
    assert pod_view({"metadata": {"name": "bare"}}).owner_uid is None


def test_owned_keeps_our_jobs_and_their_pods_only():
    ours = JobView("ft-0", 0, False, uid="j-0", owner_uid="u-1")
    stale = JobView("ft-1", 1, False, uid="j-1", owner_uid="u-old")
    pods = [PodView("a", 0, 0, "Running", owner_uid="j-0"), PodView("b", 1, 0, "Failed", exit_code=1, owner_uid="j-1"),
            PodView("c", 0, 0, "Failed", exit_code=14, message="UnknownLabel: x")]
    jobs, kept = owned("u-1", [ours, stale], pods)
    assert jobs == [ours] and [p.name for p in kept] == ["a"]


def test_foreign_owner_names_who_holds_the_object():
    assert foreign_owner({"ownerReferences": [ref("u-1")]}, "u-1") is None
    assert foreign_owner({"ownerReferences": [ref("u-2")]}, "u-1") == "controlled by FineTuneJob ft (uid u-2)"
    assert "no controller ownerReference" in foreign_owner({}, "u-1")
