"""The FINETUNE_* variables: the operator's pod builder sets them, the trainer reads the same names."""

from __future__ import annotations

import ast
from pathlib import Path

from finetune_api import env
from finetune_api.spec import parse_spec
from finetune_operator import builders

ROOT = Path(__file__).resolve().parents[3]
NAMES = {value for key, value in vars(env).items() if key.isupper() and isinstance(value, str) and value.startswith("FINETUNE_")}

SPEC = parse_spec({"model": {"uri": "s3://models/m"}, "dataset": {"train": "s3://data/t.jsonl"}, "output": {"uri": "s3://out/r"}})


def _container(metrics_port: int = 9400) -> dict:
    owner = builders.Owner(name="ft", namespace="ns", uid="u")
    job = builders.build_job(owner, SPEC, 2, builders.OperatorDefaults(metrics_port=metrics_port))
    return job["spec"]["template"]["spec"]["containers"][0]


def test_names_are_distinct_and_prefixed():
    declared = [*env.SET_BY_OPERATOR, *env.READ_BY_TRAINER, *env.LINEAGE]
    assert set(declared) == NAMES
    assert len(set(env.SET_BY_OPERATOR)) == len(env.SET_BY_OPERATOR)
    assert all(name.startswith("FINETUNE_") and name.isupper() for name in NAMES)


def test_the_pod_builder_sets_every_operator_variable():
    container = _container(metrics_port=9500)
    values = {e["name"]: e.get("value") for e in container["env"]}
    assert set(env.SET_BY_OPERATOR) <= set(values)
    assert env.LOG_LEVEL not in values  # the user's to set (spec.resources.env)
    assert values[env.JOB_NAME] == "ft" and values[env.NAMESPACE] == "ns" and values[env.ATTEMPT] == "2"
    assert values[env.METRICS_PORT] == "9500"
    assert values[env.JOB_UID] == "u"  # the FineTuneJob's uid: the trainer claims its output with it
    # The trainer writes its reason where Kubernetes reads the termination message from.
    assert values[env.TERMINATION_LOG] == container["terminationMessagePath"] == env.DEFAULT_TERMINATION_LOG
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert values[env.CACHE_DIR] in mounts
    assert any(values[env.WORK_DIR].startswith(m + "/") for m in mounts)  # writable: the root filesystem is not


def test_the_trainer_reads_the_cache_and_termination_variables(tmp_path, monkeypatch):
    from finetune_trainer import __main__ as cli
    from finetune_trainer import model

    monkeypatch.setenv(env.CACHE_DIR, str(tmp_path / "cache"))
    assert model._cache_root() == tmp_path / "cache"
    monkeypatch.setenv(env.TERMINATION_LOG, str(tmp_path / "termination-log"))
    cli.write_termination_message("InvalidConfig: x")
    assert (tmp_path / "termination-log").read_text() == "InvalidConfig: x\n"


def _string_literals(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def test_no_side_spells_a_contract_variable_out():
    """The names come from finetune_api.env, so a rename cannot miss one side."""
    modules = [ROOT / "operator" / "finetune_operator" / "builders.py", ROOT / "operator" / "finetune_operator" / "lineage.py"]
    modules += list((ROOT / "trainer-image" / "finetune_trainer").rglob("*.py"))
    spelled = {f"{p.relative_to(ROOT)}: {s}" for p in modules for s in _string_literals(p) & NAMES}
    assert not spelled, sorted(spelled)
