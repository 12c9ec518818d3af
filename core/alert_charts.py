"""Plotly figures for Triage and Thresholds: pure functions, data in, figure out."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from core.alerts import CostPoint, ThresholdPoint

ALERT_COLOUR = "#d62728"
NEUTRAL_COLOUR = "#1f77b4"
BEST_COLOUR = "#2ca02c"
_LAYOUT = {"margin": {"l": 10, "r": 10, "t": 40, "b": 10}, "height": 320}


def score_histogram(
    scores: np.ndarray, threshold: float, *, bins: int = 50, title: str = "Score distribution"
) -> go.Figure:
    """Histogram of users' combined scores; the bars at or above the threshold in red."""
    values = np.asarray(scores, dtype=np.float64)
    values = values[np.isfinite(values)]
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts, _ = np.histogram(np.clip(values, 0.0, 1.0), bins=edges)
    centres = (edges[:-1] + edges[1:]) / 2
    colours = [ALERT_COLOUR if lo >= threshold else NEUTRAL_COLOUR for lo in edges[:-1]]
    fig = go.Figure(
        go.Bar(
            x=centres,
            y=counts,
            width=np.diff(edges),
            marker_color=colours,
            hovertemplate="score %{x:.2f}: %{y} users<extra></extra>",
        )
    )
    fig.add_vline(
        x=threshold,
        line_dash="dash",
        line_color=ALERT_COLOUR,
        annotation_text=f"threshold {threshold:.2f}",
    )
    fig.update_layout(title=title, xaxis_title="combined score", yaxis_title="users", **_LAYOUT)
    fig.update_xaxes(range=[0, 1])
    return fig


def alerts_per_day_chart(frame: pd.DataFrame, *, title: str = "Alerts per day") -> go.Figure:
    """Bars from a frame with columns day, alerts."""
    fig = go.Figure(
        go.Bar(
            x=frame["day"],
            y=frame["alerts"],
            marker_color=ALERT_COLOUR,
            hovertemplate="%{x|%Y-%m-%d}: %{y} alerts<extra></extra>",
        )
    )
    fig.update_layout(title=title, xaxis_title="alert day (UTC)", yaxis_title="alerts", **_LAYOUT)
    return fig


def pr_curve_chart(curve: pd.DataFrame, point: ThresholdPoint | None = None) -> go.Figure:
    """Precision against recall (columns threshold, precision, recall), with the current
    threshold's point."""
    fig = go.Figure(
        go.Scatter(
            x=curve["recall"],
            y=curve["precision"],
            mode="lines",
            line_color=NEUTRAL_COLOUR,
            customdata=curve["threshold"],
            hovertemplate="threshold %{customdata:.3f}<br>recall %{x:.2f}, precision %{y:.2f}"
            "<extra></extra>",
            name="PR curve",
        )
    )
    if point is not None and not (math.isnan(point.recall) or math.isnan(point.precision)):
        fig.add_trace(
            go.Scatter(
                x=[point.recall],
                y=[point.precision],
                mode="markers",
                marker={"size": 12, "color": ALERT_COLOUR},
                name=f"threshold {point.threshold:.2f}",
            )
        )
    fig.update_layout(title="Precision–recall", xaxis_title="recall", yaxis_title="precision")
    fig.update_layout(**_LAYOUT)
    fig.update_xaxes(range=[0, 1.02])
    fig.update_yaxes(range=[0, 1.02])
    return fig


def confusion_chart(matrix: np.ndarray) -> go.Figure:
    """A 2×2 confusion matrix in sklearn's layout [[tn, fp], [fn, tp]]."""
    m = np.asarray(matrix, dtype=np.int64)
    fig = go.Figure(
        go.Heatmap(
            z=m,
            x=["not alerted", "alerted"],
            y=["not fraud", "fraud"],
            text=m,
            texttemplate="%{text}",
            colorscale="Blues",
            showscale=False,
            hovertemplate="%{y}, %{x}: %{z}<extra></extra>",
        )
    )
    fig.update_layout(title="Confusion matrix", **_LAYOUT)
    fig.update_yaxes(autorange="reversed")
    return fig


def cost_chart(curve: pd.DataFrame, best: CostPoint, threshold: float) -> go.Figure:
    """Expected cost per threshold (columns threshold, cost), the minimum and the current
    threshold marked."""
    fig = go.Figure(
        go.Scatter(
            x=curve["threshold"],
            y=curve["cost"],
            mode="lines",
            line_color=NEUTRAL_COLOUR,
            hovertemplate="threshold %{x:.3f}: cost %{y:,.0f}<extra></extra>",
            name="expected cost",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=[best.threshold],
            y=[best.cost],
            mode="markers",
            marker={"size": 12, "color": BEST_COLOUR, "symbol": "star"},
            name=f"minimum at {best.threshold:.3f}",
        )
    )
    fig.add_vline(x=threshold, line_dash="dash", line_color=ALERT_COLOUR)
    fig.update_layout(title="Expected cost", xaxis_title="threshold", yaxis_title="cost")
    fig.update_layout(**_LAYOUT)
    return fig


def metrics_chart(table: pd.DataFrame, threshold: float) -> go.Figure:
    """Precision, recall and F1 against the threshold, the current one marked."""
    fig = go.Figure()
    for column in ("precision", "recall", "f1"):
        fig.add_trace(go.Scatter(x=table["threshold"], y=table[column], mode="lines", name=column))
    fig.add_vline(x=threshold, line_dash="dash", line_color=ALERT_COLOUR)
    fig.update_layout(title="Precision / recall / F1", xaxis_title="threshold", **_LAYOUT)
    fig.update_yaxes(range=[0, 1.02])
    return fig


__all__ = [
    "alerts_per_day_chart",
    "confusion_chart",
    "cost_chart",
    "metrics_chart",
    "pr_curve_chart",
    "score_histogram",
]
