"""Entry point: ``python -m finetune_operator`` (or the ``finetune-operator`` console script)."""

from __future__ import annotations

import logging

import kopf

from finetune_operator import metrics
from finetune_operator.config import OperatorConfig


def main() -> None:
    config = OperatorConfig.from_env()
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metrics.serve(config.metrics_port)
    import finetune_operator.main  # noqa: F401  (registers the handlers)

    kopf.run(
        standalone=True,  # one replica (Recreate): no peering needed
        clusterwide=not config.namespaces,
        namespaces=list(config.namespaces),
        liveness_endpoint=None,  # /healthz is served with /metrics on the metrics port
    )


if __name__ == "__main__":
    main()
