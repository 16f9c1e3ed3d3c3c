"""The README's generated parts and its two commands stay true."""

from __future__ import annotations

import re
from pathlib import Path

from streams import catalog

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_topic_table_is_the_catalog_rendering() -> None:
    match = re.search(r"<!-- topics:start -->\n(.*?)<!-- topics:end -->", README, re.S)
    assert match, "README lost its topic table markers"
    assert match.group(1) == catalog.render_markdown_table(), (
        "README topic table drifted from the catalog: paste `paystream topics markdown`"
    )


def test_ci_runs_the_readme_test_command() -> None:
    assert "./dev test " in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^exec \./dev test\b", ci, re.M), "CI must run the README's test command"
