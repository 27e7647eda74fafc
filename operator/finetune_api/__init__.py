"""The FineTuneJob contract shared by the operator and the trainer; it imports neither of them.

- :mod:`~finetune_api.spec`: the spec model (the CRD is generated from it, :mod:`~finetune_api.crd`);
  :mod:`~finetune_api.validation`: the one wording of a spec that does not validate.
- :mod:`~finetune_api.status`: the status the operator writes.
- :mod:`~finetune_api.documents`: progress.json, data-report.json and the job config.
- :mod:`~finetune_api.failures`: failure reasons, exit codes and the termination line.
- :mod:`~finetune_api.env`: the FINETUNE_* variables of a training pod.
- :mod:`~finetune_api.s3`: s3:// URIs and boto3 clients.
"""

from finetune_api.spec import API_GROUP, API_VERSION, KIND, PLURAL, FineTuneJobSpec, parse_spec

__all__ = ["API_GROUP", "API_VERSION", "KIND", "PLURAL", "FineTuneJobSpec", "parse_spec"]
