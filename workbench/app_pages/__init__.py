"""One module per page; ``workbench/app.py`` routes between them."""
