"""fraudlens core: the engine behind the dashboard and the CLI. Never imports streamlit."""
