"""Graph builders in core.graphs and their Plotly figures, checked without Streamlit."""

from __future__ import annotations

import numpy as np
import pandas as pd

from core import charts, graphs


def population(pairs: dict[tuple[str, str], int]) -> pd.DataFrame:
    frame = pd.DataFrame(
        [(a, b, n) for (a, b), n in pairs.items()], columns=["event_type", "next_event_type", "n"]
    )
    frame["prob"] = frame["n"] / frame.groupby("event_type")["n"].transform("sum")
    return frame


POPULATION = population(
    {
        ("login", "view"): 90,
        ("login", "payment"): 1,  # 1 / 100: rare
        ("login", "search"): 9,
        ("view", "view"): 50,
        ("view", "cart"): 30,
        ("view", "search"): 20,
        ("cart", "payment"): 80,
        ("cart", "view"): 20,
        ("search", "view"): 100,
    }
)


def session(types: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "event_id": np.arange(len(types)),
            "ts": pd.date_range("2026-10-01", periods=len(types), freq="min"),
            "event_type": types,
        }
    )


def test_session_transitions_count_consecutive_pairs() -> None:
    pairs = graphs.session_transitions(session(["login", "view", "view", "view", "cart"]))
    got = {(a, b): n for a, b, n in pairs.itertuples(index=False)}
    assert got == {("login", "view"): 1, ("view", "view"): 2, ("view", "cart"): 1}
    assert graphs.session_transitions(session(["login"])).empty


def test_rare_and_unseen_transitions_are_flagged() -> None:
    g = graphs.session_transition_graph(
        session(["login", "payment", "purchase", "view", "cart"]), POPULATION, rare_prob=0.02
    )
    edge = g.edges["login", "payment"]
    assert edge["in_session"] and edge["rare"] and edge["color"] == graphs.RARE_COLOR
    assert edge["population_prob"] == 1 / 100
    unseen = g.edges["payment", "purchase"]  # never in the population
    assert unseen["rare"] and unseen["population_prob"] == 0.0 and unseen["population_n"] == 0
    common = g.edges["view", "cart"]
    assert common["in_session"] and not common["rare"] and common["color"] == graphs.SESSION_COLOR
    # The population's typical moves around the session are drawn too, as background.
    background = g.edges["login", "view"]
    assert not background["in_session"] and background["color"] == graphs.BACKGROUND_COLOR
    assert g.nodes["login"]["in_session"] and g.nodes["login"]["color"] == graphs.RARE_COLOR
    assert not g.nodes["search"]["in_session"]
    session_edges = {(a, b) for a, b, d in g.edges(data=True) if d["in_session"]}
    assert session_edges == {
        ("login", "payment"),
        ("payment", "purchase"),
        ("purchase", "view"),
        ("view", "cart"),
    }


def test_session_graph_of_one_event_and_its_figure() -> None:
    g = graphs.session_transition_graph(session(["view"]), POPULATION)
    assert g.nodes["view"]["session_count"] == 1
    assert not any(d["in_session"] for _, _, d in g.edges(data=True))
    fig = graphs.graph_figure(g)
    assert "view" in list(np.asarray(graphs.node_trace(fig).customdata)[:, 0])


SHARED = pd.DataFrame(
    {
        "entity_type": ["device_id", "device_id", "ip", "payment_id"],
        "entity_value": ["d1", "d1", "1.2.3.4", "card9"],
        "other_user_id": ["u2", "u3", "u2", "u4"],
        "other_events": [5, 3, 7, 1],
    }
)
SCORES = pd.DataFrame({"user_id": ["u1", "u2", "u3"], "score": [0.9, 0.2, 0.95]})
LABELS = pd.DataFrame(
    {
        "user_id": ["u2", "u3", "u3"],
        "label": ["fraud", "fraud", "legit"],
        "created_at": pd.to_datetime(["2026-10-01", "2026-10-01", "2026-10-02"]),
    }
)


def test_entity_graph_matches_the_shared_entities() -> None:
    own = pd.DataFrame(
        {"entity_type": ["device_id", "ip"], "entity_value": ["d1", "9.9.9.9"], "n_events": [4, 2]}
    )
    g = graphs.entity_graph("u1", SHARED, SCORES, LABELS, own_entities=own)
    users = {n for n, d in g.nodes(data=True) if d["kind"] == "user"}
    entities = {n for n, d in g.nodes(data=True) if d["kind"] != "user"}
    assert users == {"user:u1", "user:u2", "user:u3", "user:u4"}
    assert entities == {"device_id:d1", "ip:1.2.3.4", "payment_id:card9", "ip:9.9.9.9"}
    for kind, value, other, n in SHARED.itertuples(index=False):
        assert g.edges[f"user:{other}", f"{kind}:{value}"]["events"] == n
        assert g.has_edge("user:u1", f"{kind}:{value}")
    assert g.edges["user:u1", "device_id:d1"]["events"] == 4
    # Every edge joins a user and an entity; nothing else is invented.
    assert g.number_of_edges() == len(SHARED) + 4  # 4 focus-user links (d1, ip, card, own ip)
    assert all((g.nodes[a]["kind"] == "user") != (g.nodes[b]["kind"] == "user") for a, b in g.edges)


def test_entity_node_colours_follow_labels_then_scores() -> None:
    g = graphs.entity_graph("u1", SHARED, SCORES, LABELS)
    color = {n: d["color"] for n, d in g.nodes(data=True)}
    assert color["user:u2"] == charts.LABEL_COLORS["fraud"]
    assert color["user:u3"] == charts.LABEL_COLORS["legit"]  # the latest label wins
    assert color["user:u1"] == charts.score_color(0.9)  # unlabelled: by score
    assert color["user:u4"] == charts.UNSCORED_COLOR  # neither
    assert g.nodes["user:u1"]["focus"] and g.nodes["user:u1"]["symbol"] == "star"
    assert color["device_id:d1"] == graphs.ENTITY_STYLE["device_id"][0]


def test_entity_graph_caps_users_per_entity() -> None:
    many = pd.DataFrame(
        {
            "entity_type": "ip",
            "entity_value": "10.0.0.1",
            "other_user_id": [f"v{i:02d}" for i in range(40)],
            "other_events": np.arange(40, 0, -1),
        }
    )
    g = graphs.entity_graph("u1", many, max_users_per_entity=10)
    kept = {d["value"] for _, d in g.nodes(data=True) if d["kind"] == "user"} - {"u1"}
    assert kept == {f"v{i:02d}" for i in range(10)}  # the most active ones
    assert g.graph["hidden_users"] == 30


def test_graph_figure_customdata_is_deterministic_and_clickable() -> None:
    g = graphs.entity_graph("u1", SHARED, SCORES, LABELS)
    fig_a, fig_b = graphs.graph_figure(g, seed=3), graphs.graph_figure(g, seed=3)
    nodes = graphs.node_trace(fig_a)
    data = np.asarray(nodes.customdata)
    assert set(data[:, 0]) == set(g.nodes)
    users = {row[2] for row in data if row[1] == "user"}
    assert users == {"u1", "u2", "u3", "u4"}
    np.testing.assert_allclose(nodes.x, graphs.node_trace(fig_b).x)
    assert list(nodes.marker.color) == [g.nodes[n]["color"] for n in data[:, 0]]
    assert graphs.graph_figure(type(g)()).layout.annotations  # empty graph: a message


def test_directed_session_edges_get_arrows() -> None:
    g = graphs.session_transition_graph(session(["login", "view", "cart"]), POPULATION)
    fig = graphs.graph_figure(g)
    arrows = [a for a in fig.layout.annotations if a.showarrow]
    assert len(arrows) == sum(1 for _, _, d in g.edges(data=True) if d["in_session"])
