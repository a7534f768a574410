"""Logging set-up shared by the command-line entry points."""

import logging

# orbax-checkpoint logs every save at INFO through absl, and jax logs its backend
# search (no TPU, no GPU) at INFO; keep their warnings only.
QUIET_LOGGERS = ("absl", "orbax", "jax")


def configure_logging(level: int = logging.INFO) -> None:
    """Send log records to stderr with timestamps, and quiet the checkpoint library.

    ``force=True`` is needed because importing orbax installs a root handler,
    which would make a plain ``logging.basicConfig`` do nothing.
    """
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
