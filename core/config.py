"""Settings: paths and runtime choices, read from environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DB = Path("data/fraudlens.duckdb")
# core.model.MODEL_SIZES' names, here so the CLI's --help and the pages list them without
# importing torch (a test keeps the two equal).
MODEL_SIZE_NAMES = ("tiny", "small", "medium", "base")


@dataclass(frozen=True)
class Settings:
    db_path: Path = field(default_factory=lambda: Path(os.environ.get("FRAUDLENS_DB", DEFAULT_DB)))
    models_dir: Path = field(
        default_factory=lambda: Path(os.environ.get("FRAUDLENS_MODELS", "data/models"))
    )
    device: str = field(default_factory=lambda: os.environ.get("FRAUDLENS_DEVICE", "auto"))
    # Summary writer (core.narrate): "template" (default), "hf-local" or "openai-compatible".
    llm_backend: str = field(
        default_factory=lambda: os.environ.get("FRAUDLENS_LLM_BACKEND", "template")
    )
    llm_model_dir: Path | None = field(
        default_factory=lambda: _optional_path("FRAUDLENS_LLM_MODEL_DIR")
    )
    llm_base_url: str | None = field(
        default_factory=lambda: os.environ.get("FRAUDLENS_LLM_BASE_URL") or None
    )
    llm_model: str | None = field(
        default_factory=lambda: os.environ.get("FRAUDLENS_LLM_MODEL") or None
    )
    # repr=False: settings get printed and logged; the key must not be.
    llm_api_key: str | None = field(
        default_factory=lambda: os.environ.get("FRAUDLENS_LLM_API_KEY") or None, repr=False
    )
    llm_timeout_s: float = field(
        default_factory=lambda: float(os.environ.get("FRAUDLENS_LLM_TIMEOUT", "20"))
    )
    # openai-compatible: send placeholders instead of account, device, IP, card, item and
    # session ids (core.pseudonym); "0" sends the real ones (a server on this machine).
    llm_pseudonymise: bool = field(
        default_factory=lambda: os.environ.get("FRAUDLENS_LLM_PSEUDONYMISE", "1").strip().lower()
        not in ("0", "false", "no", "off")
    )


def _optional_path(var: str) -> Path | None:
    value = os.environ.get(var)
    return Path(value) if value else None


def get_settings() -> Settings:
    return Settings()
