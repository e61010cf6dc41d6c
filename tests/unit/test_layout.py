"""The package's shape: imports form a tree, files stay small, and the
docs show the layout as it is."""
from __future__ import annotations

import os
import re
import sys

from tests.testbed.klippy import REPO

sys.path.insert(0, str(REPO / "scripts"))
import import_tree  # noqa: E402

MAX_LINES = 400
ARCHITECTURE = os.path.join(REPO, "docs", "architecture.md")
README = os.path.join(REPO, "README.md")


def product_files() -> list[str]:
    return sorted(f for f in os.listdir(import_tree.PACKAGE)
                  if f.endswith(".py"))


def test_imports_form_a_tree():
    assert import_tree.find_cycle(import_tree.module_imports()) == []


def test_a_cycle_is_found():
    graph = {"a": ["b"], "b": ["c"], "c": ["a"], "d": []}
    assert import_tree.find_cycle(graph) == ["a", "b", "c", "a"]


def test_no_product_file_is_long():
    long = {}
    for name in product_files():
        with open(os.path.join(import_tree.PACKAGE, name)) as f:
            count = sum(1 for _ in f)
        if count > MAX_LINES:
            long[name] = count
    assert long == {}


def test_architecture_shows_the_import_tree():
    with open(ARCHITECTURE) as f:
        doc = f.read()
    section = doc[doc.index("## The import tree at a glance"):]
    shown = re.search(r"```\n(.*?)\n```", section, re.S).group(1)
    assert shown == import_tree.render(import_tree.module_imports()), (
        "run scripts/import_tree.py and paste its output into"
        " docs/architecture.md")


def test_readme_layout_names_every_module():
    with open(README) as f:
        readme = f.read()
    missing = [name for name in product_files()
               if not re.search(r"^\s+%s\s" % re.escape(name), readme, re.M)]
    assert missing == []
