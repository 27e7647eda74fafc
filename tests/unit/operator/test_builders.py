"""Pure builders: the objects a FineTuneJob owns, checked field by field."""

import re

import pytest
import yaml

from finetune_api.spec import parse_spec
from finetune_operator import builders
from finetune_operator.config import OperatorDefaults

OWNER = builders.Owner(name="llama-ft", namespace="team-a", uid="u-1", generation=2)
SPEC = {
    "model": {"uri": "s3://models/llama"},
    "dataset": {"train": "s3://data/train.jsonl"},
    "output": {"uri": "s3://out/llama-ft"},
    "resources": {"nodes": 3, "gpusPerNode": 8, "cpu": "16", "memory": "128Gi",
                  "env": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "NODE_RANK", "value": "evil"}],
                  "tolerations": [{"key": "gpu", "operator": "Exists"}], "priorityClassName": "high",
                  "imagePullSecrets": [{"name": "regcred"}]},
    "storage": {"endpoint": "http://minio:9000", "region": "eu-1", "credentialsSecret": {"name": "s3-creds"}},
}


def _job(spec=SPEC, attempt=0, **kw):
    return builders.build_job(OWNER, parse_spec(spec), attempt, OperatorDefaults(trainer_image="trainer:1"), **kw)


def test_children_are_owned_and_labelled():
    for obj in (builders.build_service(OWNER), builders.build_config_map(OWNER, parse_spec(SPEC)), _job()):
        ref = obj["metadata"]["ownerReferences"][0]
        assert ref == {"apiVersion": "finetune.io/v1alpha1", "kind": "FineTuneJob", "name": "llama-ft", "uid": "u-1",
                       "controller": True, "blockOwnerDeletion": True}
        assert obj["metadata"]["namespace"] == "team-a"
        assert obj["metadata"]["labels"][builders.LABEL_JOB] == "llama-ft"


def test_headless_service_selects_the_group_before_ready():
    svc = builders.build_service(OWNER)["spec"]
    assert svc["clusterIP"] == "None" and svc["publishNotReadyAddresses"] is True
    assert svc["selector"] == {builders.LABEL_JOB: "llama-ft", builders.LABEL_MANAGED_BY: "finetune-operator"}


def test_indexed_job_shape():
    job = _job(attempt=2)
    assert job["metadata"]["name"] == "llama-ft-2"
    assert job["metadata"]["labels"][builders.LABEL_ATTEMPT] == "2"
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == ("Indexed", 3, 3, 0)
    assert spec["suspend"] is False
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "llama-ft"
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert pod["priorityClassName"] == "high"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    c = pod["containers"][0]
    assert c["image"] == "trainer:1"
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["resources"] == {"requests": {"cpu": "16", "memory": "128Gi", "ephemeral-storage": "61Gi"},
                              "limits": {"cpu": "16", "memory": "128Gi", "ephemeral-storage": "61Gi", "nvidia.com/gpu": "8"}}
    assert {"name": "config", "mountPath": "/etc/finetune", "readOnly": True} in c["volumeMounts"]


def _volumes(job) -> dict:
    return {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}


def test_every_emptydir_has_a_size_limit_and_the_pod_requests_their_disk():
    job = _job()
    volumes = _volumes(job)
    empty_dirs = {name: v["emptyDir"] for name, v in volumes.items() if "emptyDir" in v}
    assert empty_dirs == {"cache": {"sizeLimit": "40Gi"}, "tmp": {"sizeLimit": "20Gi"}, "dshm": {"medium": "Memory", "sizeLimit": "8Gi"}}
    c = job["spec"]["template"]["spec"]["containers"][0]
    # both disk emptyDirs full plus 1Gi of logs; /dev/shm is memory and counts against the memory limit
    assert c["resources"]["requests"]["ephemeral-storage"] == c["resources"]["limits"]["ephemeral-storage"] == "61Gi"


def test_cache_and_scratch_sizes_come_from_the_spec():
    spec = {**SPEC, "resources": {"cacheSize": "500Gi", "scratchSize": "1536Mi", "shmSize": "1Gi"}}
    job = _job(spec)
    volumes = _volumes(job)
    assert volumes["cache"]["emptyDir"] == {"sizeLimit": "500Gi"}
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": "1536Mi"}
    resources = job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["ephemeral-storage"] == resources["requests"]["ephemeral-storage"] == "514560Mi"  # 502.5Gi
    for bad in ("0Gi", "10", "10GB", "1.5Gi"):
        with pytest.raises(ValueError):
            parse_spec({**SPEC, "resources": {"cacheSize": bad}})


def test_torchrun_command_uses_rank_zero_dns_and_completion_index():
    c = _job(attempt=1)["spec"]["template"]["spec"]["containers"][0]
    assert c["command"][:6] == ["torchrun", "--nnodes=3", "--nproc-per-node=8", "--node-rank=$(NODE_RANK)",
                                "--master-addr=llama-ft-1-0.llama-ft.team-a.svc", "--master-port=29500"]
    assert c["command"][6:] == ["-m", "finetune_trainer", "--config", "/etc/finetune/job.yaml"]
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env["FINETUNE_ATTEMPT"]["value"] == "1"


def test_credentials_only_by_secret_reference():
    env = {e["name"]: e for e in _job()["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AWS_ACCESS_KEY_ID"] == {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}}}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    assert env["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio:9000"
    assert env["AWS_DEFAULT_REGION"]["value"] == "eu-1"
    assert env["NCCL_DEBUG"]["value"] == "INFO"
    # a user variable cannot shadow the operator's own
    assert env["NODE_RANK"].get("value") is None


def _trial_meta(**over):
    meta = {"name": "sw-t3", "namespace": "team-a", "uid": "u-t3", "generation": 1,
            "labels": {"finetune.io/sweep": "sw", "finetune.io/sweep-trial": "3"},
            "ownerReferences": [{"apiVersion": "finetune.io/v1alpha1", "kind": "FineTuneSweep", "name": "sw", "uid": "u-sweep",
                                 "controller": True, "blockOwnerDeletion": True}]}
    meta.update(over)
    return meta


def _pod_env(owner, spec=SPEC):
    c = builders.build_job(owner, parse_spec(spec), 0, OperatorDefaults())["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in c["env"]}


def test_a_sweeps_trial_gets_the_sweeps_name_uid_and_its_trial_number():
    """The trainer nests the trial's MLflow run under the sweep's parent run with these; the operator itself never talks to MLflow."""
    owner = builders.Owner.of(_trial_meta())
    assert owner.sweep == builders.SweepTrial(name="sw", uid="u-sweep", number=3)
    env = _pod_env(owner)
    assert (env["FINETUNE_SWEEP_NAME"], env["FINETUNE_SWEEP_UID"], env["FINETUNE_SWEEP_TRIAL"]) == ("sw", "u-sweep", "3")
    assert env["FINETUNE_JOB_UID"] == "u-t3"


def test_only_a_real_sweep_trial_gets_the_sweep_variables_and_a_user_cannot_set_them():
    sweep_ref = _trial_meta()["ownerReferences"][0]
    not_trials = [
        _trial_meta(labels={}),  # created by hand: no labels
        _trial_meta(ownerReferences=[]),  # labels copied by hand, no owner
        _trial_meta(ownerReferences=[{**sweep_ref, "kind": "SomethingElse"}]),
        _trial_meta(ownerReferences=[{**sweep_ref, "controller": False}]),
        _trial_meta(ownerReferences=[{**sweep_ref, "name": "other-sweep"}]),  # owner and label disagree
        _trial_meta(labels={"finetune.io/sweep": "sw", "finetune.io/sweep-trial": "x"}),
    ]
    forged = {**SPEC, "resources": {**SPEC["resources"], "env": [{"name": "FINETUNE_SWEEP_UID", "value": "forged"},
                                                                  {"name": "FINETUNE_SWEEP_NAME", "value": "forged"}]}}
    for meta in not_trials:
        owner = builders.Owner.of(meta)
        assert owner.sweep is None, meta
        env = _pod_env(owner, forged)
        assert not {"FINETUNE_SWEEP_NAME", "FINETUNE_SWEEP_UID", "FINETUNE_SWEEP_TRIAL"} & set(env), meta
    assert _pod_env(builders.Owner.of(_trial_meta()), forged)["FINETUNE_SWEEP_UID"] == "u-sweep"  # the operator's value wins


def test_cpu_only_job_has_no_gpu_limit_and_one_process():
    spec = {**SPEC, "resources": {"nodes": 1, "gpusPerNode": 0}}
    c = _job(spec)["spec"]["template"]["spec"]["containers"][0]
    assert "--nproc-per-node=1" in c["command"]
    assert c["resources"] == {"requests": {"ephemeral-storage": "61Gi"}, "limits": {"ephemeral-storage": "61Gi"}}
    assert c["ports"] == [{"name": "rendezvous", "containerPort": 29500}, {"name": "metrics", "containerPort": 9400}]


def test_every_local_rank_declares_its_metrics_port():
    """Local rank i serves metrics on 9400 + i (finetune_trainer.metrics): one named port each, so the
    PodMonitor scrapes all ranks of a pod, not only local rank 0."""
    c = _job()["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert len(ports) == len(c["ports"])  # names are unique
    assert ports == {"rendezvous": 29500, "metrics": 9400, **{f"metrics-{i}": 9400 + i for i in range(1, 8)}}
    assert f"--nproc-per-node={sum(1 for n in ports if n.startswith('metrics'))}" in c["command"]


def test_metrics_port_names_are_valid_for_the_most_gpus_a_pod_may_have():
    limit = builders.MAX_PROCS_PER_NODE
    with pytest.raises(Exception, match="16"):  # the spec's own cap: no pod runs more local ranks
        parse_spec({**SPEC, "resources": {"gpusPerNode": limit + 1}})
    spec = {**SPEC, "resources": {"nodes": 1, "gpusPerNode": limit}}
    c = _job(spec)["spec"]["template"]["spec"]["containers"][0]
    metrics = [p for p in c["ports"] if p["name"] != "rendezvous"]
    assert [p["containerPort"] for p in metrics] == list(range(9400, 9400 + limit))
    names = [p["name"] for p in metrics]
    assert names[0] == "metrics" and names[-1] == f"metrics-{limit - 1}"
    assert len(set(names)) == limit
    # IANA_SVC_NAME: at most 15 characters, lowercase alphanumerics and '-', a letter, no '--', no edge '-'
    for name in names:
        assert len(name) <= 15 and re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", name) and "--" not in name, name
        assert re.search("[a-z]", name)
    # the PodMonitor's default port-name regex (charts/finetune-operator/values.yaml) matches them all, and nothing else
    assert all(re.fullmatch(r"metrics(-[0-9]+)?", n) for n in names)
    assert not re.fullmatch(r"metrics(-[0-9]+)?", "rendezvous")


def test_metrics_off_declares_no_metrics_port():
    job = builders.build_job(OWNER, parse_spec(SPEC), 0, OperatorDefaults(metrics_port=0))
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["ports"] == [{"name": "rendezvous", "containerPort": 29500}]


def test_headless_service_lists_rank_zero_metrics_only():
    ports = builders.build_service(OWNER)["spec"]["ports"]
    assert ports == [{"name": "rendezvous", "port": 29500, "targetPort": 29500}, {"name": "metrics", "port": 9400, "targetPort": 9400}]


def test_kueue_queue_creates_suspended_labelled_job():
    spec = {**SPEC, "resources": {"queueName": "gpu-queue"}}
    job = _job(spec)
    assert job["metadata"]["labels"][builders.KUEUE_QUEUE_LABEL] == "gpu-queue"
    assert job["spec"]["suspend"] is True


def test_trainer_config_is_the_full_spec_with_defaults():
    cm = builders.build_config_map(OWNER, parse_spec(SPEC))
    doc = yaml.safe_load(cm["data"]["job.yaml"])
    assert doc["kind"] == "FineTuneJob" and doc["metadata"]["name"] == "llama-ft"
    assert doc["spec"]["hyperparameters"]["learningRate"] == 2e-4
    assert doc["spec"]["storage"]["credentialsSecret"] == {"name": "s3-creds"}
    assert parse_spec(doc["spec"]) == parse_spec(SPEC)


def test_the_longest_admitted_name_gives_children_names_the_api_server_accepts():
    """metadata.name is capped at admission (finetune_api.spec.MAX_NAME_LENGTH) so that a training pod's
    hostname <job>-<index> stays a 63-character DNS label up to attempt 99999 and index 1023."""
    from finetune_api.spec import MAX_NAME_LENGTH, MAX_NODES, METADATA_NAME_SCHEMA
    from finetune_operator.builders import Owner, config_map_name, job_name, service_name

    owner = Owner("a" * MAX_NAME_LENGTH, "ns", "u")
    hostname = f"{job_name(owner, 10 ** 5 - 1)}-{MAX_NODES - 1}"
    assert len(hostname) == 63 and MAX_NAME_LENGTH == 52
    assert len(service_name(owner)) <= 63 and len(config_map_name(owner)) <= 253
    assert METADATA_NAME_SCHEMA["maxLength"] == MAX_NAME_LENGTH
