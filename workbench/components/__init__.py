"""Reusable Streamlit pieces: token chips, top-k table, heatmaps, the settings sidebar."""
