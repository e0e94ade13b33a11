"""Publishing runs: the static dashboard, CSV / JSON / Markdown exports and PostgreSQL."""
