"""Every setting the project reads, in one place, from the environment (see .env.example).

A ``.env`` file in the working directory is read too; variables already set in the environment win.
Secrets (``OPENAI_API_KEY``) are held as ``SecretStr`` so they print as ``**********``.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import platformdirs
from pydantic import BaseModel, SecretStr


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _load_dotenv(path: Path = Path(".env")) -> None:
    """Read KEY=VALUE lines of a .env file into os.environ without overriding what is set."""
    if not path.is_file():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip().strip('"').strip("'")
        if value:  # an empty line in .env means "use the default", not "set to empty"
            os.environ.setdefault(key.strip(), value)


class Settings(BaseModel):
    home: Path
    signals_url: str | None
    task_runner: str
    task_runner_address: str | None
    shards: int
    catalog_lock_timeout_s: float
    llm_backend: str
    local_llm: str
    openai_base_url: str | None
    openai_endpoint: str | None
    openai_api_key: SecretStr | None
    openai_key_block: str | None
    openai_model: str
    openai_max_concurrency: int
    openai_rpm: float | None
    openai_tpm: float | None
    openai_timeout_s: float
    openai_price_per_mtok: tuple[float, float] | None
    encoder: str
    torch_threads: int | None
    model_cache: Path


@lru_cache(maxsize=1)
def settings() -> Settings:
    """The settings of this process (cached; call ``settings.cache_clear()`` after changing env)."""
    _load_dotenv()
    home = Path(_env("SFT_SELECT_HOME", platformdirs.user_data_dir("sft-select"))).expanduser()
    key = _env("OPENAI_API_KEY")
    rpm, tpm, threads = _env("SFT_SELECT_OPENAI_RPM"), _env("SFT_SELECT_OPENAI_TPM"), _env("SFT_SELECT_TORCH_THREADS")
    return Settings(
        home=home,
        signals_url=_env("SFT_SELECT_SIGNALS_URL"),
        task_runner=_env("SFT_SELECT_TASK_RUNNER", "local"),
        task_runner_address=_env("SFT_SELECT_TASK_RUNNER_ADDRESS"),
        shards=int(_env("SFT_SELECT_SHARDS", "0")),
        catalog_lock_timeout_s=float(_env("SFT_SELECT_CATALOG_LOCK_TIMEOUT_S", "60")),
        llm_backend=_env("SFT_SELECT_LLM", "local"),
        local_llm=_env("SFT_SELECT_LOCAL_LLM", "smollm2-135m-instruct"),
        openai_base_url=_env("OPENAI_BASE_URL"),
        openai_endpoint=_env("SFT_SELECT_OPENAI_ENDPOINT"),
        openai_api_key=SecretStr(key) if key else None,
        openai_key_block=_env("SFT_SELECT_OPENAI_KEY_BLOCK"),
        openai_model=_env("SFT_SELECT_OPENAI_MODEL", "gpt-4o-mini"),
        openai_max_concurrency=int(_env("SFT_SELECT_OPENAI_CONCURRENCY", "16")),
        openai_rpm=float(rpm) if rpm else None,
        openai_tpm=float(tpm) if tpm else None,
        openai_timeout_s=float(_env("SFT_SELECT_OPENAI_TIMEOUT_S", "120")),
        openai_price_per_mtok=(float(_env("SFT_SELECT_OPENAI_PRICE_IN", "0")), float(_env("SFT_SELECT_OPENAI_PRICE_OUT", "0")))
        if _env("SFT_SELECT_OPENAI_PRICE_IN") or _env("SFT_SELECT_OPENAI_PRICE_OUT") else None,
        encoder=_env("SFT_SELECT_ENCODER", "all-MiniLM-L6-v2"),
        torch_threads=int(threads) if threads else None,
        model_cache=Path(_env("SFT_SELECT_MODEL_CACHE", str(home / "models"))).expanduser(),
    )
