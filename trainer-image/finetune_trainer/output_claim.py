"""The output claim (issue 9 §5): a marker object at the root of spec.output.uri naming the
FineTuneJob (namespace, name, and the uid that first claimed it) that writes there.

The trainer deletes old checkpoints and resumes from the newest one under its output, so two jobs
pointed at one prefix would delete or resume each other's. The first job claims the prefix before
anything is read or written there; every attempt of the same job goes on; any other FineTuneJob (another
name, or the same name in another namespace) stops with ``OutputClaimed`` (permanent), naming the owner
and how to free the prefix. The claim is by namespace/name, not by uid: a FineTuneJob deleted and
re-created under the same name (``kubectl delete -f job.yaml && kubectl apply -f job.yaml``) is the
same training run to its owner and continues from its checkpoints, as a restart would; the namespace is
the tenancy boundary, so no other tenant can take the prefix over that way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from finetune_api.s3 import is_s3, split_s3

from finetune_trainer.errors import OutputClaimed
from finetune_trainer.storage import Storage, join

CLAIM_MARKER = ".finetune-claim.json"
"""The object at the root of spec.output.uri naming the FineTuneJob (uid) that writes there."""


def claim_output(storage: Storage, output_uri: str, owner: dict[str, str]) -> dict[str, Any]:
    """Claim ``output_uri`` for the job ``owner`` (``uid``, ``name``, ``namespace``) before anything
    else is read or written there; returns the claim that holds.

    The trainer deletes old checkpoints and resumes from the newest one under its output: a second
    job pointed at the same prefix would delete or resume the first one's. So the first job writes a
    marker with its namespace, name and uid; every attempt of the same job (and the same
    namespace/name re-created) goes on, and any other job stops with :class:`OutputClaimed`. The marker is written only when absent (a
    conditional put on S3, an exclusive create on a filesystem) and read back, so of two jobs starting
    together exactly one wins."""
    marker = join(output_uri, CLAIM_MARKER)
    claim = _read_claim(storage, marker)
    if claim is None:
        _create_claim(storage, marker, {**owner, "claimedAt": _utc_now()})
        claim = _read_claim(storage, marker) or {}
    if (claim.get("namespace"), claim.get("name")) != (owner["namespace"], owner["name"]):
        who = f"FineTuneJob {claim.get('namespace', '?')}/{claim.get('name', '?')} (uid {claim.get('uid', '?')})"
        raise OutputClaimed(
            f"spec.output.uri {output_uri} belongs to {who} since {claim.get('claimedAt', '?')}; this job "
            f"({owner['namespace']}/{owner['name']}) would delete or resume its checkpoints. Use another output.uri, or delete "
            f"{marker} if that job and its results are no longer wanted."
        )
    return claim


def claim_output_from_env(config: Any) -> dict[str, Any] | None:
    """:func:`claim_output` for a pod's job (``config``: a JobConfig), with the uid and namespace the
    operator sets (finetune_api.env); None outside Kubernetes, where no uid is set and nothing is claimed."""
    from finetune_api import env as pod_env

    uid = os.environ.get(pod_env.JOB_UID, "").strip()
    if not uid:
        return None
    owner = {"uid": uid, "name": config.name, "namespace": os.environ.get(pod_env.NAMESPACE, "")}
    return claim_output(Storage.from_spec(config.spec.storage), config.output_uri, owner)


def _utc_now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read_claim(storage: Storage, marker: str) -> dict[str, Any] | None:
    try:
        claim = storage.read_json(marker)
    except FileNotFoundError:
        return None
    except ValueError:  # not JSON: whatever it is, it is not a claim this job made
        return {"uid": "?", "name": "unreadable claim marker"}
    return claim if isinstance(claim, dict) else {"uid": "?", "name": "unreadable claim marker"}


def _create_claim(storage: Storage, marker: str, claim: dict[str, Any]) -> None:
    """Write the marker only when no object is there (losing a race leaves the other's in place)."""
    data = (json.dumps(claim, indent=2) + "\n").encode()
    if not is_s3(marker):
        path = Path(marker)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "xb") as f:
                f.write(data)
        except FileExistsError:
            pass
        return
    bucket, key = split_s3(marker)
    from botocore.exceptions import ClientError

    with storage._s3_errors("write", marker):
        try:
            storage.client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return  # someone else's claim is there now; the caller reads it back
            if code != "NotImplemented":
                raise
            # A store without conditional writes: a plain put; the read-back still catches most races.
            storage.client.put_object(Bucket=bucket, Key=key, Body=data)
