"""The study-style report: per-head summaries, the table, figures and an HTML page."""
