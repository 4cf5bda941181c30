"""The demo's editor bundle (``atrium/static/editor.bundle.js``, built by ``web/build.sh``)
is the one ``web/package-lock.json`` asks for, carries every bundled package's licence,
and ships with the package. Offline and instant: the rebuild itself needs npm
(docs/DEVELOPMENT.md, The editor bundle)."""

from __future__ import annotations

import json
import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "atrium" / "static"
BUNDLE = STATIC / "editor.bundle.js"
LICENSES = STATIC / "editor.bundle.LICENSES.txt"


def bundled() -> dict[str, str]:
    """The packages and versions the bundle's first line says it holds."""
    first = BUNDLE.read_text(encoding="utf-8").split("\n", 1)[0]
    listed = re.search(r"editor\.bundle\.js: (.+?)\. Built by", first)
    assert listed is not None, first
    return dict(item.rsplit("@", 1) for item in listed.group(1).split())


def test_the_bundle_holds_the_locked_versions() -> None:
    lock = json.loads((ROOT / "web" / "package-lock.json").read_text(encoding="utf-8"))
    locked = {
        path.removeprefix("node_modules/"): entry["version"]
        for path, entry in lock["packages"].items()
        if path.startswith("node_modules/")
    }
    held = bundled()
    assert {"yjs", "y-websocket"} <= held.keys()
    # A version changed in the lock without running web/build.sh fails here.
    assert held == {name: locked[name] for name in held}
    # What shared-editor.js imports from it.
    exports = re.search(r"export\{([^}]*)\};?\s*$", BUNDLE.read_text(encoding="utf-8"))
    assert exports is not None
    names = {part.split(" as ")[-1] for part in exports.group(1).split(",")}
    assert names == {"WebsocketProvider", "Y"}


def test_every_bundled_package_has_its_licence() -> None:
    text = LICENSES.read_text(encoding="utf-8")
    sections = re.split(r"^-{72}$", text, flags=re.MULTILINE)
    headings = [s.rstrip().rsplit("\n", 1)[-1] for s in sections[:-1]]
    assert [h.rsplit(" (", 1)[0] for h in headings] == [f"{n} {v}" for n, v in bundled().items()]
    # Each heading names a licence, and each licence text is there (MIT: its notice).
    for heading, body in zip(headings, sections[1:], strict=True):
        assert heading.endswith("(MIT)") and "Permission is hereby granted" in body, heading


def test_the_static_files_ship_with_the_package() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["atrium"]
    files = [p.relative_to(ROOT / "atrium").as_posix() for p in STATIC.rglob("*") if p.is_file()]
    assert [f for f in files if not any(fnmatch(f, pattern) for pattern in patterns)] == []
