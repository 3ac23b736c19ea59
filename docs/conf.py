"""Sphinx configuration: MyST pages, the example notebooks with their stored outputs (never
executed here), the magics' reference read from the magic's own parsers, and the API from the
docstrings. ``make docs`` builds it offline with warnings as errors."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / "_ext"))

project = "mlx_cluster_magic"
author = "the mlx_cluster_magic developers"
copyright = "the mlx_cluster_magic developers"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "magic_reference",
]

# The notebooks live in notebooks/ (where people open and run them); the site shows copies of
# them, with the outputs stored in the repository (``make notebooks`` makes them).
_EXAMPLES = DOCS / "examples"
shutil.rmtree(_EXAMPLES, ignore_errors=True)
_EXAMPLES.mkdir()
for _nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
    shutil.copy2(_nb, _EXAMPLES / _nb.name)

nb_execution_mode = "off"
# Widget views need their JavaScript from the web; the stored HTML or text beside each one is
# what the page shows, so the site works offline.
nb_mime_priority_overrides = [
    ("html", "application/vnd.jupyter.widget-view+json", None),
]
# ... and no page loads require.js or the widgets' bundle from a CDN (myst-nb's default)
nb_ipywidgets_js: dict[str, dict[str, str]] = {}
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
# option names keep their two hyphens ("--hosts", not an en dash)
smartquotes = False

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False}

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
html_theme = "pydata_sphinx_theme"
html_title = "mlx_cluster_magic"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "footer_start": ["copyright"],
    "footer_end": [],
}
html_static_path: list[str] = []
