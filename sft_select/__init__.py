"""sft-select: choose the best subset of an instruction-tuning dataset.

The code lives in three top-level folders, installed as subpackages of ``sft_select``:
``storage/`` (``sft_select.storage``), ``tasks/`` (``sft_select.tasks``) and ``flows/``
(``sft_select.flows``). See "How it works" in README.md.

Importing the package points Prefect at a folder under ``SFT_SELECT_HOME`` (unless ``PREFECT_HOME``
is set) and switches off what fails offline, before Prefect itself is imported.
"""

import logging
import os
import sys
import warnings

from .settings import settings

__version__ = "0.1.0"

try:  # Prefect creates PREFECT_HOME below, but not its parents
    settings().home.mkdir(parents=True, exist_ok=True)
except OSError:
    pass  # a read-only home: listing and export still work; a command that writes says so in one line
# ... and so does one that needs PREFECT_HOME (flows/cli.py), in place of Prefect's warning at import
warnings.filterwarnings("ignore", message="Failed to create the Prefect home directory")
os.environ.setdefault("PREFECT_HOME", str(settings().home / "prefect"))
# The temporary server a flow starts without PREFECT_API_URL needs longer than Prefect's default on a
# busy 2-core machine, the first time above all (it creates its database).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch's spinning OpenMP threads fight faiss and MKL
# The project's own log lines (progress of long work, reuse counts) go to the console and, inside a run,
# to the Prefect UI with the run's logs.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "sft_select")
if logging.getLogger("sft_select").level == logging.NOTSET:
    logging.getLogger("sft_select").setLevel(logging.INFO)


def _join_prefect_logging() -> None:
    """Where Prefect configured logging before this package was imported (the process a worker
    starts for a flow run from the UI or a schedule), give the project's logger the handlers of
    Prefect's extra loggers, so that its lines reach the run's logs in the UI there too."""
    configuration = sys.modules.get("prefect.logging.configuration")
    if configuration is None or not configuration.PROCESS_LOGGING_CONFIG:
        return
    ours = logging.getLogger("sft_select")
    for handler in logging.getLogger("prefect.extra").handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)


_join_prefect_logging()
