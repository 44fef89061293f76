"""The Streamlit workbench: pages in ``app_pages/``, widgets in ``components/``, logic in plain modules."""
