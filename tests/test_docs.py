"""The documentation site's generated reference: every option of every ``%mlx_cluster``
subcommand appears on the page, read from the parsers the magic itself uses. (``make docs``
builds the whole site with warnings as errors; ``make test`` runs it.)"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _extension() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "magic_reference", ROOT / "docs" / "_ext" / "magic_reference.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_reference_lists_every_option_of_every_subcommand() -> None:
    from mlx_cluster_magic.cluster.magics import PARSERS

    sections = _extension().render(PARSERS)
    titles = [s.next_node().astext() for s in sections]
    assert titles == [f"%mlx_cluster {name}" for name in PARSERS]
    for section, (name, parser) in zip(sections, PARSERS.items(), strict=True):
        text = section.astext()
        assert parser.description and parser.description in text, name
        shown_by_h = parser._get_formatter()  # the words and defaults ``-h`` prints
        for action in parser._actions:
            for typed in [*action.option_strings, shown_by_h._format_action_invocation(action)]:
                assert typed in text, f"{name}: {typed} is missing from the reference"
            if action.help:
                assert shown_by_h._expand_help(action) in text, f"{name}: help of {action.dest}"


def test_a_missing_option_would_show() -> None:
    """The check above can fail: an option added to a parser shows on the page at once."""
    from mlx_cluster_magic.cluster.magics import _build_parsers

    parsers = _build_parsers()
    parsers["stop"].add_argument("--brand-new-option", help="something new")
    stop = _extension().render({"stop": parsers["stop"]})[0].astext()
    assert "--brand-new-option" in stop and "something new" in stop


def test_the_magics_page_is_the_generated_reference() -> None:
    page = (ROOT / "docs" / "reference" / "magics.md").read_text()
    assert "```{mlx-cluster-magics}\n```" in page
    assert "magic_reference" in (ROOT / "docs" / "conf.py").read_text()


def test_the_readme_fits_and_its_links_lead_somewhere() -> None:
    import re

    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    assert links, "the README links to the documentation"
    missing = [link for link in links if not (ROOT / link).exists()]
    assert missing == [], missing


SITE = Path(__file__).resolve().parent.parent / "docs" / "_build" / "html"


def test_the_site_loads_nothing_from_the_network() -> None:
    """The site works offline: no page of it loads a script or style from another host (the
    rendered notebooks once asked a CDN for require.js)."""
    pages = sorted(SITE.rglob("*.html"))
    if not pages:
        pytest.skip("the site is not built: make docs")
    remote = re.compile(r"<(?:script|link)[^>]+(?:src|href)=[\"'](?:https?:)?//", re.I)
    found = [(p.relative_to(SITE), m[0]) for p in pages for m in remote.finditer(p.read_text())]
    assert found == [], found[:5]


@pytest.mark.browser
def test_the_site_renders_a_notebook_with_its_outputs(artifacts: Path) -> None:
    """The built site (``make docs``; ``make test`` builds it first) shows notebook 02 with its
    stored outputs, in a real Chromium: the cells' code and the ranks' printed results."""
    import os

    page_path = SITE / "examples" / "02-data-parallel-mlp.html"
    if not page_path.exists():
        pytest.skip("the site is not built: make docs")
    chromium = "/usr/bin/chromium"
    if not os.access(chromium, os.X_OK):
        pytest.skip(f"no Chromium at {chromium}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            headless=True,
        )
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1600})
            page.goto(page_path.as_uri())
            page.wait_for_selector(".cell_output")
            text = page.inner_text("main")
            assert "%%px" in text and "[stdout:0]" in text and "[stdout:1]" in text
            assert page.locator(".cell_output").count() >= 3
            page.screenshot(path=str(artifacts / "docs-notebook-02.png"), full_page=False)
        finally:
            browser.close()
