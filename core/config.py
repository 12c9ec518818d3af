"""Settings: paths and runtime choices, read from environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DB = Path("data/fraudlens.duckdb")


@dataclass(frozen=True)
class Settings:
    db_path: Path = field(default_factory=lambda: Path(os.environ.get("FRAUDLENS_DB", DEFAULT_DB)))
    models_dir: Path = field(
        default_factory=lambda: Path(os.environ.get("FRAUDLENS_MODELS", "data/models"))
    )
    device: str = field(default_factory=lambda: os.environ.get("FRAUDLENS_DEVICE", "auto"))


def get_settings() -> Settings:
    return Settings()
