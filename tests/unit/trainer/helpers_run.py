"""Entry point for trainer subprocesses in tests (plain, kill -9, SIGTERM, torchrun).

Same as ``python -m finetune_trainer``, plus one test-only knob: FT_TEST_STEP_SLEEP=<seconds> slows
every optimizer step so a test can act (kill -9, SIGTERM, scrape metrics) while training runs.
"""

import os
import sys

_sleep = float(os.environ.get("FT_TEST_STEP_SLEEP", "0") or 0)
if _sleep > 0:
    import time

    from finetune_trainer.metrics import TrainerMetrics

    _on_step = TrainerMetrics.on_step

    def _slow_on_step(self, **kw):
        _on_step(self, **kw)
        time.sleep(_sleep)

    TrainerMetrics.on_step = _slow_on_step

from finetune_trainer.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
