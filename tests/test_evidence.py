"""The facts an explanation may cite, gathered from the database and the model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core import cases, store
from core.evidence import explain_user, population_statistics, save_explanation
from core.narrate import TemplateNarrator, check_grounding, narrate
from core.scoring import LoadedModel, load_model
from tests.conftest import DemoEnv


@pytest.fixture(scope="module")
def loaded(demo_env: DemoEnv) -> LoadedModel:
    return load_model(demo_env.models_dir / demo_env.model_id, device="cpu")


def _user_sharing_a_device(con) -> tuple[str, str]:
    row = con.execute(
        "SELECT a.user_id, b.user_id FROM (SELECT DISTINCT user_id, device_id FROM events) a "
        "JOIN (SELECT DISTINCT user_id, device_id FROM events) b USING (device_id) "
        "WHERE a.user_id < b.user_id ORDER BY 1, 2 LIMIT 1"
    ).fetchone()
    assert row is not None, "the demo world shares devices between users"
    return str(row[0]), str(row[1])


def test_facts_hold_what_the_page_and_summary_need(
    demo_db_copy: DemoEnv, loaded: LoadedModel
) -> None:
    with store.open_db(demo_db_copy.db_path) as con:
        user, other = _user_sharing_a_device(con)
        cases.add_label(con, other, "fraud", "ana", "known ring")
        found = explain_user(con, loaded, user, threshold=0.7)
        assert found is not None
        facts = found.facts
        n_events = con.execute("SELECT count(*) FROM events WHERE user_id = ?", [user]).fetchone()
        stored = con.execute(
            "SELECT score FROM sequence_scores WHERE user_id = ? AND model_id = ?",
            [user, loaded.model_id],
        ).fetchone()
    assert facts.user_id == user and facts.model_id == loaded.model_id
    assert n_events is not None and facts.n_events == n_events[0]
    assert stored is not None and facts.score == pytest.approx(stored[0], abs=1e-4)
    assert facts.threshold == 0.7
    assert 1 <= len(facts.top_events) <= 5
    weights = [e.weight for e in facts.top_events]
    assert all(0 < w <= 1 for w in weights)
    # in the explanation's order (the deletion search's picks first), positive ones only
    ranked = found.attribution.event_ids[found.attribution.order[:5]]
    positive = found.attribution.per_event[found.attribution.order[:5]] > 0
    assert [e.event_id for e in facts.top_events] == ranked[positive].tolist()
    top_ids = set(found.top_events["event_id"])
    assert {e.event_id for e in facts.top_events} <= top_ids
    assert all(e.fields and e.top_field for e in facts.top_events)
    assert facts.counterfactual is not None and facts.counterfactual.k == 5
    linked_users = {u for entity in facts.linked for u in entity.users}
    assert other in linked_users
    assert any(entity.labels.get(other) == "fraud" for entity in facts.linked)
    names = {p.name for p in facts.peer_stats}
    assert {"events per active day", "distinct devices"} <= names
    assert "login" in facts.vocabulary
    # The template summary of these facts is grounded, and it names the linked fraud label.
    summary = narrate(facts, TemplateNarrator())
    assert not summary.flagged, summary.grounding.problems
    assert check_grounding(summary.text, facts).grounded
    assert other in summary.text


def test_population_statistics_and_a_range_without_events(
    demo_env: DemoEnv, loaded: LoadedModel
) -> None:
    with store.open_db(demo_env.db_path, read_only=True) as con:
        stats = population_statistics(con)
        assert (stats["p95"] >= stats["median"]).all()
        user = con.execute("SELECT min(user_id) FROM events").fetchone()[0]  # type: ignore[index]
        early = pd.Timestamp("1990-01-01").to_pydatetime()
        assert explain_user(con, loaded, user, None, early, threshold=0.5) is None


def test_kept_explanation_is_what_the_analyst_saw(
    demo_db_copy: DemoEnv, loaded: LoadedModel
) -> None:
    with store.open_db(demo_db_copy.db_path) as con:
        user = con.execute("SELECT min(user_id) FROM truth_events").fetchone()[0]  # type: ignore[index]
        found = explain_user(con, loaded, user, threshold=0.5)
        assert found is not None
        summary = narrate(found.facts, TemplateNarrator())
        save_explanation(con, found, summary)
        row = con.execute(
            "SELECT top_events, counterfactual, summary, summary_backend, grounded, settings "
            "FROM explanations WHERE user_id = ?",
            [user],
        ).fetchone()
    assert row is not None
    top_events, sentence, text, backend, grounded, settings = row
    first = found.top_events.iloc[0]
    assert str(first["event_type"]) in top_events
    assert sentence == found.counterfactual.sentence()
    assert text == summary.text and backend == "template" and grounded
    assert '"LayerIntegratedGradients"' in settings


def test_case_export_takes_the_newest_explanation_whole(
    demo_db_copy: DemoEnv, loaded: LoadedModel
) -> None:
    with store.open_db(demo_db_copy.db_path) as con:
        user = con.execute("SELECT min(user_id) FROM truth_events").fetchone()[0]  # type: ignore[index]
        found = explain_user(con, loaded, user, threshold=0.5)
        assert found is not None
        save_explanation(con, found, narrate(found.facts, TemplateNarrator()))
        save_explanation(con, found, None)  # newer, without a summary
        case_id = cases.open_case(con, "ana", [user], title="check")
        frame = cases.case_export_frame(
            con, [case_id], model_id=loaded.model_id, threshold=0.5, analyst="ana"
        )
    row = frame.iloc[0]
    assert row["top_attributed_events"]
    assert pd.isna(row["summary"]) and pd.isna(row["summary_backend"])


def test_given_a_path_the_file_is_closed_while_captum_runs(
    demo_db_copy: DemoEnv, loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dashboard's explanation job and `fraudlens explain` pass the database path: the
    file must not be held open (locked against an ingest in another process) during the
    attributions and the deletion check, only for the reads around them."""
    import duckdb

    import core.evidence as evidence_module

    path = str(demo_db_copy.db_path)
    real = evidence_module.explain_events
    seen: list[bool] = []

    def probing(*args, **kwargs):
        # A read-only open in this process fails while a read-write instance of the file is
        # alive here ("different configuration"); it succeeds when nothing holds it.
        try:
            duckdb.connect(path, read_only=True).close()
            seen.append(True)
        except duckdb.Error:
            seen.append(False)
        return real(*args, **kwargs)

    monkeypatch.setattr(evidence_module, "explain_events", probing)
    with store.open_db(path) as con:
        user = _user_sharing_a_device(con)[0]
        held = explain_user(con, loaded, user, threshold=0.7)  # a connection: used as is
    assert seen == [False] and held is not None
    free = explain_user(path, loaded, user, threshold=0.7)
    assert seen == [False, True] and free is not None
    assert free.facts == held.facts


def test_reading_an_explanation_at_another_threshold_equals_computing_it_there(
    demo_env: DemoEnv, loaded: LoadedModel
) -> None:
    """The page moves the threshold without a new Captum run: the re-read facts must be
    exactly those a fresh explanation at that threshold gives."""
    from core.evidence import at_threshold

    with store.open_db(demo_env.db_path, read_only=True) as con:
        user = _user_sharing_a_device(con)[0]
    low = explain_user(demo_env.db_path, loaded, user, threshold=0.3, read_only=True)
    high = explain_user(demo_env.db_path, loaded, user, threshold=0.99, read_only=True)
    assert low is not None and high is not None
    moved = at_threshold(low, 0.99)
    assert moved.facts == high.facts and moved.facts != low.facts
    assert moved.attribution is low.attribution  # nothing recomputed
    assert moved.counterfactual.sentence() == high.counterfactual.sentence()
    assert at_threshold(low, 0.3) is low


def test_a_ranged_explanation_describes_the_range_read_with_its_history(
    demo_env: DemoEnv, loaded: LoadedModel
) -> None:
    with store.open_db(demo_env.db_path, read_only=True) as con:
        user = con.execute(
            "SELECT user_id FROM events GROUP BY user_id HAVING count(*) >= 40 ORDER BY 1 LIMIT 1"
        ).fetchone()[0]  # type: ignore[index]
        history = store.user_events(con, user)
    start = history["ts"].iloc[len(history) // 2].to_pydatetime()
    in_range = history[history["ts"] >= start]
    found = explain_user(demo_env.db_path, loaded, user, start, None, threshold=0.5)
    assert found is not None
    att = found.attribution
    assert found.facts.n_events == len(in_range)
    assert found.facts.first_ts == in_range["ts"].min().to_pydatetime()
    assert att.n_context > 0 and att.n_events == len(in_range)
    in_ids = set(in_range["event_id"])
    assert set(found.timeline_attribution["event_id"]) == in_ids
    assert set(found.top_events["event_id"]) <= in_ids
    assert {e.event_id for e in found.facts.top_events} <= in_ids
    summary = narrate(found.facts, TemplateNarrator())
    assert not summary.flagged, summary.grounding.problems


def test_an_explanation_reads_the_other_accounts_on_a_device_as_scoring_does(
    demo_env: DemoEnv, loaded: LoadedModel
) -> None:
    """The device / card counts come from the whole database: an explanation that featurised
    the user's events alone would see no other account and explain a different score."""
    from core.explain import ExplainSettings
    from core.scoring import score_users
    from core.sequences import FIELDS, FLAG_SEEN, load_events

    with store.open_db(demo_env.db_path, read_only=True) as con:
        events = load_events(con).to_pandas()
        short = events.groupby("user_id")["event_id"].transform("size") <= 128  # one window
        shared = events[short & (events["device_id__accounts_before"] >= 1)]
        assert not shared.empty, "the demo world shares devices between users"
        user, event_id = str(shared["user_id"].iloc[0]), int(shared["event_id"].iloc[0])
        found = explain_user(
            con, loaded, user, threshold=0.5,
            settings=ExplainSettings(n_steps=8, target="unsupervised"),
        )  # fmt: skip
    assert found is not None
    att = found.attribution
    position = int(np.flatnonzero(att.event_ids == event_id)[0])
    assert att.fields[position, FIELDS.index("device_accounts")] > FLAG_SEEN
    scored = score_users(demo_env.db_path, loaded, users=[user], write=False)
    assert att.target_value == pytest.approx(float(scored["score_unsupervised"].iloc[0]), rel=1e-4)
