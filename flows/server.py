"""The temporary Prefect server of one CLI command, and what the CLI does on SIGINT or SIGTERM.

With no ``PREFECT_API_URL``, Prefect starts a temporary server itself, as a plain child in the
CLI's process group: Ctrl-C reaches it first, it dies, and the interrupted run then retries the dead
API for minutes, leaving the flow run "Running"; a SIGTERM or kill -9 of the CLI leaves it orphaned.
:func:`temporary_api` starts that server instead, the same way (Prefect's own app, no UI), but in
its own session, so a signal to the CLI's group never reaches it, and under a watchdog
(``python -m sft_select.flows.server PARENT_PID ...``) that stops it when its parent is gone. The
CLI keeps it until the run's final state and logs are reported, then stops it.

:func:`interruptible` turns SIGINT and SIGTERM into one line and exit code 130 or 143, after
Prefect has marked the run crashed; every finished batch is already on disk, so the same command
resumes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

WATCH_INTERVAL_S = 0.5
GRACE_S = 3  # for the graceful shutdown after the parent is gone; then the server exits for good


def _temporary_server_class() -> type:
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class TemporaryServer(SubprocessASGIServer):
        """Prefect's temporary server, started in its own session under a parent watchdog."""

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            import prefect

            env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                   "PREFECT__SERVER_FINAL": "1", **get_current_settings().to_environment_variables(exclude_unset=True)}
            return subprocess.Popen(
                [sys.executable, "-m", __name__, str(os.getpid()), "--app-dir", str(prefect.__module_path__.parent),
                 "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port",
                 str(self.port), "--log-level", "error", "--lifespan", "on"],
                env=env, start_new_session=True)

    return TemporaryServer


def _drain_prefect_workers() -> None:
    """Send the logs and events still queued while the server is up (Prefect's test harness does the same)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=5)
    EventsWorker.drain_all(timeout=5)


@contextmanager
def temporary_api() -> Iterator[str | None]:
    """Point Prefect at a temporary server for the duration (yields its API URL), unless
    ``PREFECT_API_URL`` names one already (yields None)."""
    import prefect.context
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield None
        return
    # Registered, like Prefect's own, as "the" temporary server of the process: Prefect code that asks
    # for one (events, logs) finds this one instead of starting a second.
    server = _temporary_server_class()()
    try:
        server.start()
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}), \
                prefect.context._temporary_global_settings_context(prefect.context.get_settings_context()):
            try:
                yield server.api_url
            finally:
                _drain_prefect_workers()
    finally:
        server.stop()


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that every ``finally`` runs."""


_received: list[int] = []  # the signals this process was sent: what an interrupted call turned them into may differ


def _on_signal(signum: int, frame: Any) -> None:
    _received.append(signum)
    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


@contextmanager
def interruptible(message: str = "finished batches are kept: run the same command again to resume") -> Iterator[None]:
    """Run the body; on SIGINT (Ctrl-C) or SIGTERM print one line and exit 130 or 143.

    Prefect's engine marks an interrupted flow run crashed (it sees the KeyboardInterrupt, or turns
    SIGTERM into its own termination signal); the body's ``finally`` blocks (the temporary server's
    shutdown) run before this prints. A second signal during that clean-up is ignored.
    """
    from prefect.exceptions import TerminationSignal

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    _received.clear()
    try:
        yield
    except BaseException as e:
        # a signal can surface as another error: DuckDB turns one that arrives mid-query into
        # "Query interrupted", and the flow run then fails with it
        if not (_received or isinstance(e, (KeyboardInterrupt, Terminated, TerminationSignal))):
            raise
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        first = _received[0] if _received else (signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM)
        name, code = ("SIGINT", 130) if first == signal.SIGINT else ("SIGTERM", 143)
        sys.stdout.flush()
        print(f"stopped by {name}: {message}", file=sys.stderr, flush=True)
        # Threads still busy with the interrupted work (a model call in flight) must not hold the exit.
        os._exit(code)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _watch_parent(parent: int) -> None:
    """Stop this server (gracefully, then for good) once ``parent`` is no longer its parent."""
    while os.getppid() == parent:
        time.sleep(WATCH_INTERVAL_S)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    os._exit(1)


def main(argv: list[str]) -> None:
    """``python -m sft_select.flows.server PARENT_PID UVICORN_ARGS...``: uvicorn under a parent watchdog."""
    from uvicorn.main import main as uvicorn_main

    parent = int(argv[0])
    if os.getppid() != parent:  # the parent died before we got here
        sys.exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="parent-watchdog").start()
    uvicorn_main(argv[1:], prog_name="uvicorn")


if __name__ == "__main__":
    main(sys.argv[1:])
