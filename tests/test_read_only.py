"""Fault drill: a home on a read-only filesystem.

The CLI runs as a real process in its own mount namespace where the folder is bind-mounted
read-only (``unshare -rm``: works as root, who ignores file modes, and as a user where user
namespaces are allowed). Listing and export must work; a command that writes must fail at once with
one line naming the folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from sft_select.storage import Store, read_examples

CLI = str(Path(sys.executable).parent / "sft-select")
MOUNT_READ_ONLY = 'mount --bind -o ro "$0" "$0" && exec "$@"'


@pytest.fixture(scope="module")
def can_mount(tmp_path_factory) -> None:
    folder = str(tmp_path_factory.mktemp("probe"))
    if shutil.which("unshare") is None:
        pytest.skip("cannot bind-mount a folder read-only here: no unshare (util-linux)")
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", MOUNT_READ_ONLY, folder, "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot bind-mount a folder read-only here (unshare -rm: {probe.stderr.decode().strip()})")


def _read_only(folder: Path, *args: str, **env: str) -> tuple[int, str, str, float]:
    """Run the CLI with ``folder`` read-only; returns exit code, stdout, stderr and seconds taken."""
    environ = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | env
    started = time.monotonic()
    done = subprocess.run(["unshare", "-rm", "sh", "-c", MOUNT_READ_ONLY, str(folder), CLI, *args], env=environ,
                          capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout, done.stderr, time.monotonic() - started


@pytest.fixture
def archive(tmp_path, can_mount) -> tuple[Path, str]:
    """A store holding a dataset and a selection, made before the folder is mounted read-only."""
    home = tmp_path / "home"
    rows = [{"instruction": f"Task {i}", "input": "", "output": "word " * (i + 1)} for i in range(12)]
    (tmp_path / "pool.json").write_text(json.dumps(rows))
    store = Store(home)
    info = store.datasets.register("pool", read_examples(tmp_path / "pool.json").examples)
    chosen = store.datasets.read("pool").head(3).select("uid", score=pl.lit(1.0), reason=pl.lit("test"))
    selection = store.selections.save(method="longest", params={}, dataset=info, selection=chosen)
    return home, selection


def _one_line_naming(err: str, what: str, folder: Path) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"{what} {folder} is read-only" in lines[0], err


def test_read_only_store_lists_and_exports(archive, tmp_path):
    home, selection = archive
    env = {"SFT_SELECT_HOME": str(home), "PREFECT_HOME": str(home / "prefect")}
    code, out, err, _ = _read_only(home, "datasets", **env)
    assert code == 0 and "pool" in out, err
    code, out, err, _ = _read_only(home, "selections", **env)
    assert code == 0 and selection in out, err
    code, out, err, _ = _read_only(home, "export", selection, "--to", "messages", str(tmp_path / "out.jsonl"), **env)
    assert code == 0, err
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 3


def test_read_only_store_refuses_a_run_in_one_line(archive):
    home, _ = archive
    code, out, err, took = _read_only(home, "run", "longest", "--dataset", "pool", "--budget", "2",
                                      SFT_SELECT_HOME=str(home), PREFECT_HOME=str(home / "prefect"))
    assert code == 2
    _one_line_naming(err, "SFT_SELECT_HOME", home)
    assert took < 30  # at once: no server is started, nothing is retried


def test_new_home_on_a_read_only_filesystem(tmp_path, can_mount):
    home = tmp_path / "ro" / "home"  # does not exist yet; its parent is read-only
    home.parent.mkdir()
    env = {"SFT_SELECT_HOME": str(home), "PREFECT_HOME": str(home / "prefect")}
    code, out, err, _ = _read_only(home.parent, "datasets", **env)
    assert code == 0 and "No datasets yet" in out and "Traceback" not in err, err
    code, out, err, _ = _read_only(home.parent, "ingest", str(tmp_path / "none.json"), "--name", "x", **env)
    assert code == 2
    _one_line_naming(err, "SFT_SELECT_HOME", home)


def test_read_only_prefect_home_is_named(archive, tmp_path):
    home, _ = archive
    prefect_home = tmp_path / "ro" / "prefect"
    prefect_home.parent.mkdir()
    code, out, err, _ = _read_only(prefect_home.parent, "run", "longest", "--dataset", "pool",
                                   SFT_SELECT_HOME=str(home), PREFECT_HOME=str(prefect_home))
    assert code == 2
    _one_line_naming(err, "PREFECT_HOME", prefect_home)
