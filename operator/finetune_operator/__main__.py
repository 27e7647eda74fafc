"""Entry point: ``python -m finetune_operator`` (or the ``finetune-operator`` console script)."""

from __future__ import annotations

import logging

import kopf

from finetune_operator import logsafe, metrics
from finetune_operator.config import OperatorConfig


def _memory_debugging() -> None:
    """Log the top allocation sites on SIGUSR1 (FINETUNE_TRACEMALLOC=1, for memory investigations)."""
    import signal
    import tracemalloc

    tracemalloc.start(10)

    def dump(*_: object) -> None:
        current, peak = tracemalloc.get_traced_memory()
        logging.getLogger("tracemalloc").warning("traced now %.1f MiB, peak %.1f MiB", current / 2**20, peak / 2**20)
        stats = tracemalloc.take_snapshot().statistics("traceback")[:15]
        for stat in stats:
            logging.getLogger("tracemalloc").warning("%s\n%s", stat, "\n".join(stat.traceback.format()[-6:]))

    signal.signal(signal.SIGUSR1, dump)


def main() -> None:
    config = OperatorConfig.from_env()
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logsafe.install()  # DEBUG never prints Secret data, signatures or tokens (see logsafe)
    if config.tracemalloc:
        _memory_debugging()
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
