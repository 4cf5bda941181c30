"""The documents a user reads hold together: no merge left its conflict markers in them,
the README stays short, every relative link reaches a file and a heading, and the
configuration reference is the one its rows generate, covering every variable
``load_settings`` reads with the defaults a bare start gets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from atrium.core import config
from atrium.core.config_reference import ENVIRONMENT_VARIABLES, reference_markdown

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^(<{7}|>{7})( |$)|^={7}$", re.MULTILINE)


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_no_merge_conflict_markers(path: Path) -> None:
    found = [m.group(0) for m in MARKER.finditer(path.read_text(encoding="utf-8"))]
    assert found == [], f"{path.name} holds merge conflict markers: {found}"


README = ROOT / "README.md"
README_MOST_LINES = 400
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def test_the_readme_is_short_enough_to_read() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines < README_MOST_LINES, (
        f"README.md has {lines} lines (under {README_MOST_LINES}): move detail to docs/"
    )


def test_the_readme_links_every_page_in_docs() -> None:
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(README)}
    unlinked = [p.name for p in DOCUMENTS[1:] if p.resolve() not in linked]
    assert unlinked == [], f"README.md links no page for {unlinked}: add them to its list"


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``path``: lower case, punctuation dropped,
    spaces to hyphens, and ``-1``, ``-2``, ... on repeats."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(
        r"^#{1,6} (.+)$", FENCE.sub("", path.read_text(encoding="utf-8")), re.MULTILINE
    ):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(path: Path) -> list[str]:
    text = CODE_SPAN.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_every_relative_link_reaches_a_file_and_heading(path: Path) -> None:
    broken = []
    for target in links(path):
        file, _, anchor = target.partition("#")
        destination = (path.parent / file).resolve() if file else path
        if not destination.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target} (no such heading in {destination.name})")
    assert broken == [], f"{path.name} links to what does not exist: {broken}"


def test_the_configuration_reference_is_generated_from_its_rows() -> None:
    written = (ROOT / "docs" / "CONFIGURATION.md").read_text(encoding="utf-8")
    assert written == reference_markdown(), (
        "docs/CONFIGURATION.md differs from atrium/core/config_reference.py: run "
        "python -m atrium.core.config_reference > docs/CONFIGURATION.md"
    )


class Recording(dict[str, str]):
    """An environment that notes every variable read from it."""

    def __init__(self, values: dict[str, str]) -> None:
        super().__init__(values)
        self.read: set[str] = set()

    def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return super().__contains__(key)


def test_every_variable_load_settings_reads_has_a_row(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env = Recording({"ENVIRONMENT": "test", "DATA_DIR": str(tmp_path)})
    # load_settings copies its mapping with dict(); keep the recording one instead.
    monkeypatch.setattr(config, "dict", lambda mapping: mapping, raising=False)
    config.load_settings(env)
    documented = {name for row in ENVIRONMENT_VARIABLES for name in row.names}
    missing, stale = env.read - documented, documented - env.read
    assert not missing, (
        f"load_settings reads {missing}: add rows to atrium/core/config_reference.py"
    )
    assert not stale, (
        f"atrium/core/config_reference.py has rows for {stale}: load_settings never reads them"
    )


def shown(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, Path) and not value.is_absolute():
        return f"./{value}"
    return str(value)


def test_the_documented_defaults_are_the_ones_a_bare_start_gets(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # the development key goes to ./.atrium
    settings = config.load_settings({})
    checked, wrong = 0, []
    for row in ENVIRONMENT_VARIABLES:
        defaults = row.default.split(" / ")
        if len(defaults) != len(row.names):
            continue
        for name, default in zip(row.names, defaults, strict=True):
            literal = re.fullmatch(r"`([^`]*)`", default)
            field = name.lower()
            value = getattr(settings, field, None)
            if literal is None or not isinstance(value, bool | int | float | str | tuple | Path):
                continue  # prose ("the core count"), or not one plain field
            checked += 1
            if shown(value) != literal.group(1):
                wrong.append(f"{name}: documented {default}, is {value!r}")
    assert checked > 40, checked
    assert wrong == [], wrong
