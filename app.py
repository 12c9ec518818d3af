"""fraudlens — the router and frame: page config, navigation, the shared sidebar."""

from __future__ import annotations

import streamlit as st

from core.config import get_settings

st.set_page_config(page_title="fraudlens", page_icon="🔎", layout="wide")

settings = get_settings()
st.session_state.setdefault("db_path", str(settings.db_path))

pages = [
    st.Page("pages/overview.py", title="Overview", icon="📊", url_path="overview", default=True),
]
navigation = st.navigation(pages)

with st.sidebar:
    st.caption(f"Database: `{st.session_state['db_path']}`")

navigation.run()
