"""Figure builders in core.charts: pure functions, checked without Streamlit."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from core import charts


def make_events(n: int, *, days: float = 2.0, seed: int = 0, sessions: int = 5) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2026-10-01")
    offsets = np.sort(rng.uniform(0, days * 86400, n))
    types = np.array(["view", "search", "cart", "purchase"])
    return pd.DataFrame(
        {
            "event_id": np.arange(1000, 1000 + n, dtype=np.int64),
            "ts": start + pd.to_timedelta(offsets, unit="s"),
            "user_id": "u1",
            "session_id": [f"s{i * sessions // n}" for i in range(n)],
            "event_type": types[rng.integers(0, len(types), n)],
            "price": rng.uniform(1, 100, n),
            "country": "GB",
            "text": None,
            "surprisal": rng.gamma(2.0, 2.0, n),
        }
    )


def shapes_named(fig: go.Figure, name: str) -> list:
    return [s for s in fig.layout.shapes if s.name == name]


def test_timeline_one_trace_per_event_type_with_event_ids_in_customdata() -> None:
    events = make_events(40)
    fig = charts.score_timeline(events)
    names = {t.name for t in fig.data}
    assert names == set(events["event_type"])
    assert all(isinstance(t, go.Scatter) for t in fig.data)  # few points: SVG, not WebGL
    ids = np.concatenate([np.asarray(t.customdata)[:, 0].astype(np.int64) for t in fig.data])
    assert sorted(ids) == sorted(events["event_id"])
    for trace in fig.data:
        # Each point's y is that event's surprisal: customdata and y stay aligned.
        by_id = events.set_index("event_id")["surprisal"]
        expected = by_id.loc[np.asarray(trace.customdata)[:, 0].astype(np.int64)].to_numpy()
        np.testing.assert_allclose(np.asarray(trace.y), expected)
        assert "price" in trace.hovertemplate and "country" in trace.hovertemplate
        assert "text" not in trace.hovertemplate  # an all-empty field is left out
    assert not fig.layout.xaxis.rangeslider.visible  # short history: range buttons, no slider
    assert fig.layout.xaxis.rangeselector.buttons
    assert charts.score_timeline(events, rangeslider_above=39).layout.xaxis.rangeslider.visible


def test_threshold_line_and_session_bands() -> None:
    events = make_events(60, sessions=6)
    fig = charts.score_timeline(events, threshold=4.5)
    (line,) = shapes_named(fig, "threshold")
    assert line.y0 == line.y1 == 4.5
    assert len(shapes_named(fig, "session")) == 6
    assert not shapes_named(charts.score_timeline(events), "threshold")
    assert not shapes_named(charts.score_timeline(events, threshold=float("nan")), "threshold")


def test_fifty_thousand_events_are_bounded_and_keep_the_peaks() -> None:
    events = make_events(50_000, days=90, sessions=4000)
    started = time.perf_counter()
    fig = charts.score_timeline(events, threshold=8.0, max_points=3000, max_bins=1000)
    elapsed = time.perf_counter() - started
    meta = fig.layout.meta
    assert meta["aggregated"] and meta["total_points"] == 50_000
    assert meta["shown_points"] == 3000
    assert charts.point_count(fig) <= 3000 + 1000
    assert all(isinstance(t, go.Scattergl) for t in fig.data)
    markers = [t for t in fig.data if t.mode == "markers"]
    shown_max = max(float(np.max(t.y)) for t in markers)
    assert shown_max == pytest.approx(events["surprisal"].max())
    (line,) = [t for t in fig.data if t.mode == "lines"]
    assert float(np.max(line.y)) == pytest.approx(events["surprisal"].max())
    assert len(shapes_named(fig, "session")) <= 300
    assert fig.layout.xaxis.rangeslider.visible  # a long history gets the range slider
    assert elapsed < 10, f"50k-event timeline took {elapsed:.1f} s"


def test_numeric_colour_column_gives_one_continuous_trace() -> None:
    events = make_events(30)
    events["attribution"] = np.linspace(-1.0, 2.0, len(events))
    fig = charts.score_timeline(events, color_by="attribution")
    (trace,) = fig.data
    np.testing.assert_allclose(np.asarray(trace.marker.color), events["attribution"])
    assert trace.marker.cmid == 0.0  # signed values: diverging scale centred on zero
    assert "attribution" in trace.hovertemplate


def test_colour_map_is_respected_and_category_colours_are_stable() -> None:
    events = make_events(30)
    fig = charts.score_timeline(events, color_map={"view": "#123456"})
    assert next(t for t in fig.data if t.name == "view").marker.color == "#123456"
    a = charts.category_colors(["view", "cart", "search"])
    b = charts.category_colors(["search", "view", "cart", "cart"])
    assert a == b and len(set(a.values())) == 3


def test_unscored_and_empty_inputs() -> None:
    events = make_events(20)
    events.loc[events.index[:5], "surprisal"] = np.nan
    fig = charts.score_timeline(events)
    assert fig.layout.meta["unscored"] == 5 and charts.point_count(fig) == 15
    empty = charts.score_timeline(events.iloc[0:0])
    assert len(empty.data) == 0 and empty.layout.annotations
    unscored = charts.score_timeline(events.assign(surprisal=np.nan))
    assert len(unscored.data) == 0


def test_single_event_and_hover_text_is_escaped() -> None:
    events = make_events(1).assign(text="<b onmouseover=x>hi</b>")
    fig = charts.score_timeline(events, threshold=1.0)
    (trace,) = fig.data
    row = list(np.asarray(trace.customdata)[0])
    assert row[0] == 1000
    assert "&lt;b onmouseover=x&gt;hi&lt;/b&gt;" in row
    assert not any("<b onmouseover" in str(v) for v in row)


def test_score_color_scale() -> None:
    assert charts.score_color(None) == charts.UNSCORED_COLOR
    assert charts.score_color(float("nan")) == charts.UNSCORED_COLOR
    assert charts.score_color(0.0) != charts.score_color(1.0)
    assert charts.score_color(5.0) == charts.score_color(1.0)  # clipped to [0, 1]
