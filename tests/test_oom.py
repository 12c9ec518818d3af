"""Out of GPU memory: the work goes on in smaller parts, with the same results.

No GPU here: the model raises torch.OutOfMemoryError (what CUDA raises) whenever it is handed
more than a few sequences at once, as a card with little free memory would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from core import store
from core.explain import ExplainSettings, counterfactual, explain_events
from core.oom import AcceleratorOutOfMemory, PartSizer
from core.scoring import LoadedModel, load_model, score_encoded
from core.sequences import load_events
from tests.conftest import DemoEnv


@pytest.fixture(scope="module")
def loaded(demo_env: DemoEnv) -> LoadedModel:
    return load_model(demo_env.models_dir / demo_env.model_id, device="cpu")


def test_part_sizer_halves_on_out_of_memory_and_keeps_the_smaller_size() -> None:
    seen: list[tuple[int, int]] = []

    def work(part: slice) -> list[int]:
        if part.stop - part.start > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        seen.append((part.start, part.stop))
        return list(range(part.start, part.stop))

    sizer = PartSizer("things")
    out = [x for _, values in sizer.run(10, work) for x in values]
    assert out == list(range(10))  # every item once, in order
    assert sizer.limit is not None and sizer.limit <= 3 and sizer.splits >= 1
    # the next batch starts at the size learnt, without failing first
    splits = sizer.splits
    assert [x for _, v in sizer.run(7, work) for x in v] == list(range(7))
    assert sizer.splits == splits


def test_one_item_that_does_not_fit_says_what_to_do() -> None:
    def work(part: slice) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(AcceleratorOutOfMemory, match="FRAUDLENS_DEVICE=cpu"):
        list(PartSizer("windows").run(4, work))


def _limit_batch(
    monkeypatch: pytest.MonkeyPatch, model: torch.nn.Module, name: str, most: int
) -> list[int]:
    """Make model.<name> raise out-of-memory for batches larger than ``most``; returns the
    batch sizes it ran."""
    original: Callable[..., Any] = getattr(model, name)
    sizes: list[int] = []

    def limited(*args: Any, **kwargs: Any) -> Any:
        first = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        if first.shape[0] > most:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        sizes.append(int(first.shape[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(model, name, limited)
    return sizes


def test_batch_scoring_goes_on_in_smaller_batches(
    demo_env: DemoEnv, loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    with store.open_db(demo_env.db_path, read_only=True) as con:
        users = [
            r[0] for r in con.execute("SELECT DISTINCT user_id FROM events LIMIT 40").fetchall()
        ]
        encoded = loaded.featurizer.transform(load_events(con, users=users))
    max_len = int(loaded.model.config.max_len)
    whole = score_encoded(loaded.model, encoded, max_len=max_len, device=loaded.device)
    sizes = _limit_batch(monkeypatch, loaded.model, "forward", 5)
    parts = score_encoded(loaded.model, encoded, max_len=max_len, device=loaded.device)
    assert sizes and max(sizes) <= 5
    np.testing.assert_allclose(parts.surprisal, whole.surprisal, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(parts.supervised, whole.supervised, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(parts.embedding, whole.embedding, rtol=1e-4, atol=1e-5)


def test_an_explanation_goes_on_with_fewer_steps_per_batch(
    demo_env: DemoEnv, loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    with store.open_db(demo_env.db_path, read_only=True) as con:
        user = con.execute(
            "SELECT user_id FROM truth_events GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1"
        ).fetchone()[0]  # type: ignore[index]
        events = store.user_events(con, user)
    settings = ExplainSettings(n_steps=16)
    whole = explain_events(loaded, events, settings)
    check = counterfactual(loaded, events, whole)
    # Captum's steps, the window choice and the deletion search's subsets all meet the limit
    sizes = _limit_batch(monkeypatch, loaded.model, "forward_from_embeddings", 4)
    parts = explain_events(loaded, events, settings)
    assert sizes and max(sizes) <= 4
    assert parts.settings.internal_batch_size == 4  # 16 -> 8 -> 4: what it ran with is saved
    np.testing.assert_allclose(parts.per_field, whole.per_field, rtol=1e-3, atol=1e-5)
    assert parts.order.tolist() == whole.order.tolist()
    again = counterfactual(loaded, events, parts)
    assert again.score_without_top == pytest.approx(check.score_without_top, abs=1e-5)


def test_the_device_setting_is_read_and_an_absent_gpu_falls_back_to_the_cpu(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from core.train import resolve_device

    monkeypatch.setenv("FRAUDLENS_DEVICE", "tpu-9000")
    with pytest.raises(ValueError, match="use auto, cpu or cuda"):
        resolve_device()  # the environment's setting is the default
    monkeypatch.setenv("FRAUDLENS_DEVICE", "cpu")
    assert resolve_device().type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with caplog.at_level("WARNING", logger="core.train"):
            assert resolve_device("cuda").type == "cpu"
        assert "no CUDA GPU" in caplog.text
    else:
        with pytest.raises(ValueError, match="CUDA GPU"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    if not torch.backends.mps.is_available():
        assert resolve_device("mps").type == "cpu"
