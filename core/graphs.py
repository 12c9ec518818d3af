"""Graphs an analyst reads: a session's event transitions and the accounts linked to a user.

Builders return networkx graphs whose nodes and edges carry both meaning (counts,
probabilities, scores, labels) and drawing attributes (``color``, ``size``, ``symbol``,
``hover``, ``width``, ``arrow``); ``graph_figure`` turns any such graph into a Plotly figure
with a seeded layout, so the same data always draws the same picture. Each node's customdata
is ``[node id, kind, value]``: a click on a ``kind == "user"`` node names the user to open.
"""

from __future__ import annotations

import html
import math
from typing import Any

import networkx as nx
import numpy as np
import pandas as pd
import plotly.graph_objects as go

from core.charts import LABEL_COLORS, empty_figure, score_color

RARE_COLOR = "#d62728"
SESSION_COLOR = "#1f77b4"
BACKGROUND_COLOR = "#c7c7c7"
ENTITY_STYLE: dict[str, tuple[str, str]] = {  # kind -> (colour, marker symbol)
    "device_id": ("#6b6ecf", "square"),
    "ip": ("#8c6d31", "diamond"),
    "payment_id": ("#17becf", "triangle-up"),
}


def _esc(value: object) -> str:
    return html.escape(str(value))


# ---------------------------------------------------------------------------------------------
# Session transitions


def session_transitions(session_events: pd.DataFrame) -> pd.DataFrame:
    """Consecutive (event_type -> next_event_type) pairs of one session with their counts."""
    if session_events.empty:
        return pd.DataFrame({"event_type": [], "next_event_type": [], "n": []})
    order = [c for c in ("ts", "event_id") if c in session_events.columns]
    types = session_events.sort_values(order, kind="stable")["event_type"].astype("string")
    pairs = pd.DataFrame({"event_type": types.to_numpy(), "next_event_type": types.shift(-1)})
    pairs = pairs.dropna()
    return (
        pairs.groupby(["event_type", "next_event_type"], as_index=False)
        .size()
        .rename(columns={"size": "n"})
    )


def session_transition_graph(
    session_events: pd.DataFrame,
    population_transitions: pd.DataFrame,
    *,
    rare_prob: float = 0.02,
    background_min_prob: float = 0.05,
    max_background_edges: int = 60,
) -> nx.DiGraph:
    """The session's transitions drawn over the population's typical ones.

    ``population_transitions`` has event_type, next_event_type, n and prob (P(next | current)
    over all users). A session edge is ``rare`` when its population probability is below
    ``rare_prob`` (0 when the population never made that move). Background edges are the
    population's common moves (prob >= ``background_min_prob``) touching the session's event
    types, at most ``max_background_edges`` of them.
    """
    pop = population_transitions
    stats = {
        (str(a), str(b)): (int(n), float(p))
        for a, b, n, p in pop[["event_type", "next_event_type", "n", "prob"]].itertuples(
            index=False
        )
    }
    graph = nx.DiGraph(kind="session")
    seen = session_events["event_type"].astype("string").value_counts()
    for node, count in seen.items():
        graph.add_node(str(node), kind="event_type", in_session=True, session_count=int(count))
    session_nodes = set(graph.nodes)
    background = pop[
        (pop["prob"] >= background_min_prob)
        & (pop["event_type"].isin(session_nodes) | pop["next_event_type"].isin(session_nodes))
    ].nlargest(max_background_edges, "n")
    for a, b, n, p in background[["event_type", "next_event_type", "n", "prob"]].itertuples(
        index=False
    ):
        for node in (str(a), str(b)):
            if node not in graph:
                graph.add_node(node, kind="event_type", in_session=False, session_count=0)
        graph.add_edge(
            str(a),
            str(b),
            in_session=False,
            session_count=0,
            population_n=int(n),
            population_prob=float(p),
            rare=False,
        )
    for a, b, n in session_transitions(session_events).itertuples(index=False):
        pop_n, p = stats.get((str(a), str(b)), (0, 0.0))
        graph.add_edge(
            str(a),
            str(b),
            in_session=True,
            session_count=int(n),
            population_n=pop_n,
            population_prob=p,
            rare=p < rare_prob,
        )
    _style_session_graph(graph)
    return graph


def _style_session_graph(graph: nx.DiGraph) -> None:
    for node, data in graph.nodes(data=True):
        loops = graph.edges[node, node]["session_count"] if graph.has_edge(node, node) else 0
        rare_in = any(
            graph.edges[e]["rare"] and graph.edges[e]["in_session"]
            for e in [*graph.in_edges(node), *graph.out_edges(node)]
        )
        data.update(
            label=node,
            size=14 + 4 * math.log1p(data["session_count"]) if data["in_session"] else 10,
            color=(RARE_COLOR if rare_in else SESSION_COLOR)
            if data["in_session"]
            else BACKGROUND_COLOR,
            symbol="circle",
            value=node,
            hover=f"<b>{_esc(node)}</b><br>{data['session_count']} in this session"
            + (f"<br>{loops} × repeated in a row" if loops else ""),
        )
    for a, b, data in graph.edges(data=True):
        p = data["population_prob"]
        if data["in_session"]:
            color = RARE_COLOR if data["rare"] else SESSION_COLOR
            width = 1.5 + 1.5 * math.log1p(data["session_count"])
            hover = (
                f"{_esc(a)} → {_esc(b)}: {data['session_count']}× in this session"
                f"<br>population P(next) = {p:.1%}" + (" — rare" if data["rare"] else "")
            )
        else:
            color, width = BACKGROUND_COLOR, 1.0
            hover = f"{_esc(a)} → {_esc(b)}: typical, P(next) = {p:.1%}"
        data.update(color=color, width=width, hover=hover, arrow=data["in_session"])


# ---------------------------------------------------------------------------------------------
# Entity links


def _latest_labels(labels: pd.DataFrame | None) -> dict[str, str]:
    if labels is None or labels.empty:
        return {}
    frame = labels
    if "created_at" in frame.columns:
        frame = frame.sort_values("created_at", kind="stable")
    last = frame.groupby("user_id")["label"].last()
    return {str(u): str(v) for u, v in last.items() if pd.notna(v)}


def entity_graph(
    user_id: str,
    shared_entities: pd.DataFrame,
    user_scores: pd.DataFrame | None = None,
    labels: pd.DataFrame | None = None,
    *,
    own_entities: pd.DataFrame | None = None,
    max_users_per_entity: int = 25,
) -> nx.Graph:
    """User – devices / IPs / cards – other users sharing them.

    ``shared_entities``: entity_type, entity_value, other_user_id, other_events (as
    ``store.shared_entities``). ``user_scores``: user_id, score (combined, [0, 1]).
    ``labels``: user_id, label (latest per user wins when created_at is present).
    ``own_entities`` (entity_type, entity_value, n_events) adds the user's unshared entities
    too. Users are coloured by label when labelled, else by score. An entity shared with more
    than ``max_users_per_entity`` users keeps its most active ones; ``graph.graph["hidden_users"]``
    counts the rest.
    """
    scores = (
        {
            str(u): float(s)
            for u, s in zip(user_scores["user_id"], user_scores["score"], strict=True)
        }
        if user_scores is not None and not user_scores.empty
        else {}
    )
    label_of = _latest_labels(labels)
    graph = nx.Graph(kind="entity", focus=str(user_id), hidden_users=0)

    def add_user(uid: str) -> str:
        node = f"user:{uid}"
        if node not in graph:
            graph.add_node(
                node,
                kind="user",
                value=uid,
                score=scores.get(uid),
                label_value=label_of.get(uid),
                focus=uid == str(user_id),
            )
        return node

    def add_entity(kind: str, value: str) -> str:
        node = f"{kind}:{value}"
        if node not in graph:
            graph.add_node(node, kind=kind, value=value)
        return node

    focus = add_user(str(user_id))
    if own_entities is not None:
        for kind, value, n in own_entities[["entity_type", "entity_value", "n_events"]].itertuples(
            index=False
        ):
            graph.add_edge(focus, add_entity(str(kind), str(value)), events=int(n))
    if not shared_entities.empty:
        ranked = shared_entities.sort_values("other_events", ascending=False, kind="stable")
        rank = ranked.groupby(["entity_type", "entity_value"]).cumcount()
        graph.graph["hidden_users"] = int(
            ranked.loc[rank >= max_users_per_entity, "other_user_id"].nunique()
        )
        for kind, value, other, n in ranked.loc[
            rank < max_users_per_entity,
            ["entity_type", "entity_value", "other_user_id", "other_events"],
        ].itertuples(index=False):
            entity = add_entity(str(kind), str(value))
            if not graph.has_edge(focus, entity):
                graph.add_edge(focus, entity, events=0)
            graph.add_edge(add_user(str(other)), entity, events=int(n))
    _style_entity_graph(graph)
    return graph


def _style_entity_graph(graph: nx.Graph) -> None:
    for node, data in graph.nodes(data=True):
        kind, value = data["kind"], data["value"]
        if kind == "user":
            label = data["label_value"]
            score = data["score"]
            color = LABEL_COLORS.get(label or "", score_color(score))
            score_text = "unscored" if score is None else f"score {score:.2f}"
            data.update(
                color=color,
                size=26 if data["focus"] else 16,
                symbol="star" if data["focus"] else "circle",
                label=value,
                hover=f"<b>{_esc(value)}</b><br>{score_text}<br>label: {_esc(label or '—')}"
                + ("" if data["focus"] else "<br>click to open"),
            )
        else:
            color, symbol = ENTITY_STYLE.get(kind, ("#7f7f7f", "hexagon"))
            users = sum(1 for n in graph.neighbors(node) if graph.nodes[n]["kind"] == "user")
            data.update(
                color=color,
                size=12,
                symbol=symbol,
                label=value if len(value) <= 16 else value[:15] + "…",
                hover=f"<b>{_esc(kind)}</b> {_esc(value)}<br>{users} user(s)",
            )
    for a, b, data in graph.edges(data=True):
        n = data.get("events", 0)
        data.update(
            color="#999999",
            width=1.0 + math.log1p(n) / 2,
            hover=f"{_esc(graph.nodes[a]['value'])} — {_esc(graph.nodes[b]['value'])}: "
            f"{n} event(s)",
            arrow=False,
        )


# ---------------------------------------------------------------------------------------------
# Drawing


def graph_figure(
    graph: nx.Graph,
    *,
    seed: int = 7,
    height: int = 420,
    title: str | None = None,
    max_arrows: int = 80,
) -> go.Figure:
    """Plotly figure of a styled graph (spring layout with a fixed seed).

    One line trace per edge style, an invisible marker at each edge's midpoint for its hover,
    arrows for directed edges marked ``arrow``, and one marker trace for the nodes whose
    customdata rows are ``[node id, kind, value]``.
    """
    if graph.number_of_nodes() == 0:
        return empty_figure("Nothing to draw.", height=height)
    pos = nx.spring_layout(graph, seed=seed, k=1.5 / math.sqrt(graph.number_of_nodes()))
    fig = go.Figure()
    styles: dict[tuple[str, float], list[tuple[Any, Any]]] = {}
    mid_x, mid_y, mid_text = [], [], []
    annotations = []
    for a, b, data in graph.edges(data=True):
        if a == b:
            continue  # self-loops are counted in the node's hover
        key = (str(data.get("color", "#999")), round(float(data.get("width", 1.0)), 1))
        styles.setdefault(key, []).append((a, b))
        (xa, ya), (xb, yb) = pos[a], pos[b]
        mid_x.append((xa + xb) / 2)
        mid_y.append((ya + yb) / 2)
        mid_text.append(data.get("hover", ""))
        if graph.is_directed() and data.get("arrow") and len(annotations) < max_arrows:
            annotations.append(
                {
                    "x": xb,
                    "y": yb,
                    "ax": xa,
                    "ay": ya,
                    "xref": "x",
                    "yref": "y",
                    "axref": "x",
                    "ayref": "y",
                    "showarrow": True,
                    "arrowhead": 2,
                    "arrowsize": 1.2,
                    "arrowwidth": 1.2,
                    "arrowcolor": data.get("color", "#999"),
                    "standoff": 9,
                    "startstandoff": 6,
                    "text": "",
                }
            )
    # Draw background edges first so highlighted ones sit on top.
    for (color, width), edges in sorted(
        styles.items(), key=lambda kv: kv[0][0] != BACKGROUND_COLOR
    ):
        xs: list[float | None] = []
        ys: list[float | None] = []
        for a, b in edges:
            xs += [float(pos[a][0]), float(pos[b][0]), None]
            ys += [float(pos[a][1]), float(pos[b][1]), None]
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                line={"color": color, "width": width},
                hoverinfo="skip",
                showlegend=False,
            )
        )
    if mid_x:
        fig.add_trace(
            go.Scatter(
                x=mid_x,
                y=mid_y,
                mode="markers",
                marker={"size": 8, "opacity": 0},
                hovertext=mid_text,
                hoverinfo="text",
                showlegend=False,
                name="edges",
            )
        )
    nodes = list(graph.nodes(data=True))
    fig.add_trace(
        go.Scatter(
            x=[float(pos[n][0]) for n, _ in nodes],
            y=[float(pos[n][1]) for n, _ in nodes],
            mode="markers+text",
            text=[_esc(d.get("label", n)) for n, d in nodes],
            textposition="top center",
            textfont={"size": 10},
            marker={
                "color": [d.get("color", "#7f7f7f") for _, d in nodes],
                "size": [d.get("size", 12) for _, d in nodes],
                "symbol": [d.get("symbol", "circle") for _, d in nodes],
                "line": {"width": 1, "color": "#333"},
            },
            customdata=np.array(
                [[str(n), str(d.get("kind", "")), str(d.get("value", n))] for n, d in nodes],
                dtype=object,
            ),
            hovertext=[d.get("hover", str(n)) for n, d in nodes],
            hoverinfo="text",
            showlegend=False,
            name="nodes",
        )
    )
    fig.update_layout(
        height=height,
        title=title,
        annotations=annotations,
        showlegend=False,
        hovermode="closest",
        dragmode="pan",
        margin={"l": 10, "r": 10, "t": 30 if title else 10, "b": 10},
        xaxis={"visible": False},
        yaxis={"visible": False},
        plot_bgcolor="white",
    )
    return fig


def node_trace(fig: go.Figure) -> go.Scatter:
    """The figure's node trace (the one a click selects from)."""
    return next(t for t in fig.data if t.name == "nodes")


__all__ = [
    "BACKGROUND_COLOR",
    "ENTITY_STYLE",
    "RARE_COLOR",
    "SESSION_COLOR",
    "entity_graph",
    "graph_figure",
    "node_trace",
    "session_transition_graph",
    "session_transitions",
]
