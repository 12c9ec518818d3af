"""Shared test setup: nothing is fetched from a model hub; one small scored demo world."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@dataclass(frozen=True)
class DemoEnv:
    """A small demo database with a trained tiny model and stored scores."""

    db_path: Path
    models_dir: Path
    model_id: str


@pytest.fixture(scope="session")
def demo_env(tmp_path_factory: pytest.TempPathFactory) -> DemoEnv:
    """Built once per test run (~15 s): 400 users, 10% fraud, tiny model, all users scored.

    Tests that write must copy the database (see ``demo_db_copy``), so they stay independent.
    """
    import torch

    from core import store
    from core.demo import build_demo
    from core.scoring import load_model, score_users
    from core.simulate import WorldConfig
    from core.train import TrainConfig, train_model

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("demo_env")
    db_path = root / "demo.duckdb"
    models_dir = root / "models"
    build_demo(db_path, WorldConfig(n_users=400, days=20, fraud_rate=0.1, seed=11))
    with store.open_db(db_path) as con:
        result = train_model(
            con,
            TrainConfig(size="tiny", epochs=1, supervised_epochs=1, max_len=128),
            models_dir=models_dir,
            progress=False,
        )
        score_users(con, load_model(result.path), progress=False)
    return DemoEnv(db_path=db_path, models_dir=models_dir, model_id=result.model_id)


@pytest.fixture()
def demo_db_copy(demo_env: DemoEnv, tmp_path: Path) -> DemoEnv:
    """A private copy of the demo database for tests that write to it."""
    import shutil

    target = tmp_path / "demo.duckdb"
    shutil.copy(demo_env.db_path, target)
    return DemoEnv(db_path=target, models_dir=demo_env.models_dir, model_id=demo_env.model_id)


@pytest.fixture()
def app_navigation_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make AppTest route like the live server does once app.py has run.

    app.py always routes with st.navigation, but a `pages/` folder beside it makes Streamlit
    start in its old folder-based mode until st.navigation first runs, and AppTest resets that
    guess before every run — so after switch_page a page could run without app.py's frame.
    """
    import streamlit.testing.v1.app_test as app_test
    from streamlit.runtime.pages_manager import PagesManager

    class NavigationPagesManager(PagesManager):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            PagesManager.uses_pages_directory = False

    monkeypatch.setattr(app_test, "PagesManager", NavigationPagesManager)


def burst_users(db_path: Path, model_id: str, limit: int = 1) -> list[str]:
    """Fraudulent users with a scripted burst (20 or more injected events), the model's most
    confident first: whose explanations have a kind of behaviour that carries the score."""
    from core import store

    with store.open_db(db_path, read_only=True) as con:
        rows = con.execute(
            "SELECT s.user_id FROM sequence_scores s JOIN (SELECT user_id FROM truth_events "
            "GROUP BY 1 HAVING count(*) >= 20) t USING (user_id) WHERE s.model_id = ? "
            "AND s.window_start IS NULL ORDER BY s.score_supervised DESC, 1 LIMIT ?",
            [model_id, limit],
        ).fetchall()
    return [str(r[0]) for r in rows]
