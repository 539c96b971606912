"""Sphinx configuration of the scrapy-ingestion documentation (MyST Markdown).

Build: ``tox -e docs``, or ``sphinx-build -W --keep-going -b html docs docs/_build/html``.

The build must work offline (CI has no internet), so intersphinx, which downloads
inventories, is only enabled with ``SCRAPY_INGEST_DOCS_INTERSPHINX=1``. The pages link
to Scrapy's and Python's documentation with plain URLs, never with intersphinx-only
references, so they build the same either way.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _version() -> str:
    """``scrapy_ingest.__version__``, read from the source when the package cannot be imported."""
    try:
        import scrapy_ingest
    except ImportError:
        source = (ROOT / "scrapy_ingest" / "__init__.py").read_text(encoding="utf-8")
        for node in ast.parse(source).body:
            if (
                isinstance(node, ast.Assign)
                and any(getattr(t, "id", None) == "__version__" for t in node.targets)
                and isinstance(node.value, ast.Constant)
            ):
                return str(node.value.value)
        raise
    return str(scrapy_ingest.__version__)


project = "scrapy-ingestion"
author = "scrapy_ingest developers"
copyright = "2026, scrapy_ingest developers"
release = _version()
version = ".".join(release.split(".")[:2])

extensions = ["myst_parser"]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "requirements.txt"]

# Anchors for headings down to ###, so that [INGEST_BATCH_ROWS](settings.md#ingest_batch_rows)
# resolves here as it does on GitHub.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist"]

if os.environ.get("SCRAPY_INGEST_DOCS_INTERSPHINX") == "1":
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3/", None),
        "scrapy": ("https://docs.scrapy.org/en/latest/", None),
    }

html_theme = "furo" if importlib.util.find_spec("furo") else "alabaster"
html_title = f"scrapy-ingestion {release}"
