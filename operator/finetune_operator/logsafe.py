"""Logging that stays free of secret values at every level, DEBUG included.

At DEBUG the libraries the operator uses print what they send and receive: the Kubernetes client logs
every response body (a Secret's data, when the operator reads a job's credentials Secret), botocore
logs canonical requests and headers (a session token, signatures) and urllib3 logs request URLs (a
presigned URL carries its signature). None of that helps debug the operator, so these libraries stay
at INFO whatever ``logLevel`` says, and a filter on the handlers drops any of their records below
INFO that still gets through (a child logger given its own level, ``kubernetes`` ``Configuration.debug``).
"""

from __future__ import annotations

import logging

CHATTY_LIBRARIES = ("kubernetes", "botocore", "boto3", "s3transfer", "urllib3")
"""Loggers (with their children) whose DEBUG records may carry request/response contents."""


class DropLibraryDebug(logging.Filter):
    """Refuse records below INFO from :data:`CHATTY_LIBRARIES` (attached to handlers, so it sees the
    records every child logger propagates)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.INFO:
            return True
        return not any(record.name == lib or record.name.startswith(lib + ".") for lib in CHATTY_LIBRARIES)


def install(handlers: list[logging.Handler] | None = None) -> None:
    """Cap the chatty libraries at INFO and filter ``handlers`` (default: the root logger's)."""
    for lib in CHATTY_LIBRARIES:
        logger = logging.getLogger(lib)
        if logger.level == logging.NOTSET or logger.level < logging.INFO:
            logger.setLevel(logging.INFO)
    for handler in handlers if handlers is not None else logging.getLogger().handlers:
        if not any(isinstance(f, DropLibraryDebug) for f in handler.filters):
            handler.addFilter(DropLibraryDebug())
