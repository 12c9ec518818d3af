"""Start the dashboard with its heavy imports already done: ``python -m pages._serve [options]``
takes the options of ``streamlit run`` (``make run`` uses it).

Explaining a score needs torch, transformers and Captum: about 14 s of imports on a 2-core
laptop (transformers alone pulls in torch.distributed, dynamo and sympy). A plain
``streamlit run app.py`` pays that inside the first Investigate request, while the browser is
drawing the page on the same cores, and the first explanation waits for it. Importing them
here, before the server listens, moves the wait to start-up, where ``make run`` already waits
for the demo and the model; later sessions find the modules loaded. The model itself is loaded
by the first page that needs it (``pages._shared.loaded_model``): it depends on the session's
database.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "app.py"


def preload() -> float:
    """Import what the pages use, the explanation stack included; returns the seconds taken."""
    import logging

    started = time.perf_counter()
    # st.cache_data checks its parameters when it decorates, and outside a running server it
    # warns "No runtime found" for each function; the caches themselves are made on first
    # call, inside the server, so the warning says nothing here.
    cache_log = logging.getLogger("streamlit.runtime.caching.cache_data_api")
    level = cache_log.level
    cache_log.setLevel(logging.ERROR)
    try:
        # LightGBM: the account-level model (sklearn and scipy come with it)
        import lightgbm  # noqa: F401

        import pages._explain_panel  # noqa: F401  torch, transformers, Captum, core.explain
        import pages._shared  # noqa: F401  pandas, DuckDB
        from core import (  # noqa: F401  Plotly, networkx, the account-level model
            aggregate_model,
            alert_charts,
            cases,
            graphs,
            investigate,
        )
    finally:
        cache_log.setLevel(level)
    return time.perf_counter() - started


def leave_a_core_for_the_browser() -> int:
    """torch threads for this server: all cores but one. On a laptop the analyst's browser
    draws the page on the same cores while an explanation runs; two busy torch threads on two
    cores starve it (measured: the Investigate plots drew ~0.5 s later)."""
    import os

    import torch

    threads = max(1, (os.cpu_count() or 1) - 1)
    torch.set_num_threads(threads)
    return threads


def spare_the_collector() -> int:
    """Move every object alive now (the modules just imported: ~0.5M objects) out of the
    garbage collector's sight; returns how many.

    Streamlit runs a full ``gc.collect(2)`` after every script run (``runner.postScriptGC``),
    holding the GIL. With torch, transformers and sympy loaded that walk took 0.33 s on the
    2-core development VM, after *each* run: before a page switch starts the next page, and
    after each poll of a running explanation. Module-level objects live as long as the
    process, so the collector has nothing to find among them; gc.freeze() is Python's tool for
    exactly this (objects created later, per session, are collected as before). A plain
    ``streamlit run app.py`` (and AppTest) runs without it, only slower."""
    import gc

    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def route_with_navigation_only() -> None:
    """Tell Streamlit that app.py routes with st.navigation from the first request on.

    A ``pages/`` folder beside app.py makes Streamlit start in its old folder-based mode until
    some session's app.py has called st.navigation. So the first session after a start that
    opened a deep link (``/investigate?user=u1``, say from a case ticket) was answered "Page
    not found: running the app's main page" in a modal over the right page, since the folder
    has no ``investigate.py``. st.navigation sets this same class flag when it runs; setting it
    before the first request only does that earlier."""
    from streamlit.runtime.pages_manager import PagesManager

    PagesManager.uses_pages_directory = False


def main() -> None:
    from streamlit.web import cli

    route_with_navigation_only()
    seconds = preload()
    leave_a_core_for_the_browser()
    frozen = spare_the_collector()
    print(
        f"fraudlens: page modules loaded in {seconds:.1f} s ({frozen:,} objects frozen)",
        file=sys.stderr,
        flush=True,
    )
    sys.argv = ["streamlit", "run", str(APP), *sys.argv[1:]]
    cli.main()


if __name__ == "__main__":
    main()
