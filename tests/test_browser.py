"""The browser pages, in a real browser: headless Chromium (Debian's ``chromium``) driven by
Playwright's sync API, against ``python run.py`` on a real port.

- ``/demo`` logs in, picks a project, sees who is here and their cursor, makes edits, and
  survives a server restart in the middle: every edit is stored exactly once.
- ``/demo``'s shared editor: two people type into one live document at once and see the
  same text, with each other's cursors; a viewer's page shows it read-only; the document
  is intact after a server restart.
- ``/docs`` renders Swagger UI with every request to anything but the server blocked.
- atrium.js resends edits whose ACK never came, and the server stores each once.

Plain sync tests (pytest-trio leaves them alone): Playwright's sync API runs its own
asyncio loop, and the server is a subprocess that the test restarts on the same port.
A screenshot of each page goes to ``test-artifacts/``. Without chromium these tests skip,
except in CI (``CI`` set), where they fail: ``.ci/run`` installs it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import CLIENT_TLS
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Page,
    Playwright,
    Route,
    expect,
    sync_playwright,
)

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI and this machine run as root
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PASSWORD = "correct horse"
TIMEOUT_MS = 15_000
RECONNECT_MS = 35_000  # atrium.js's largest reconnect delay (30 s) and a margin


def need_chromium() -> None:
    """Skip the calling test without chromium, except in CI, where that fails it."""
    if not os.access(CHROMIUM, os.X_OK):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")


@pytest.fixture(autouse=True)
def _chromium() -> None:
    need_chromium()


class RunPy:
    """``python run.py serve`` on one port, stopped with SIGTERM and started again."""

    def __init__(self, tmp_path: Path, database_url: str) -> None:
        self.port = 0
        self.url = ""
        self.log = tmp_path / "server.log"
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("ENVIRONMENT", "SECRET_KEY", "DATABASE_URL", "WS_PORT")
        }
        self.env.update(
            ENVIRONMENT="test",
            SECRET_KEY="browser-test-secret-key-with-enough-length-0123456789",
            DATABASE_URL=database_url,
            DATA_DIR=str(tmp_path / "data"),
            RATE_LIMIT_PER_MINUTE="10000",
            AUTH_RATE_LIMIT_PER_MINUTE="10000",
            METRICS_PORT="0",
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start on ``self.port`` (0 the first time: any free port) and wait until it serves."""
        with open(self.log, "ab") as errors:
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "run.py"), "serve", "--port", str(self.port)],
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=errors,
            )
        assert self.process.stdout is not None
        out = b""
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + 60
            while b"API on " not in out or not out.endswith(b"\n"):
                remaining = deadline - time.monotonic()
                assert remaining > 0 and selector.select(remaining), "the server did not start"
                chunk = os.read(self.process.stdout.fileno(), 4096)
                assert chunk, f"the server exited: {self.log.read_text()[-2000:]}"
                out += chunk
        self.url = out.split(b"API on ")[1].split()[0].decode()
        self.port = urlsplit(self.url).port or 0

    def stop(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=30) == 0
        assert self.process.stdout is not None
        self.process.stdout.close()
        self.process = None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            assert self.process.stdout is not None
            self.process.stdout.close()
            self.process = None


@pytest.fixture(scope="module")
def module_run_py(
    tmp_path_factory: pytest.TempPathFactory, module_database_url: str
) -> Iterator[RunPy]:
    """One ``run.py serve`` for the module's tests (starting one costs seconds): each test
    signs up users of its own (``signup`` makes every email unique)."""
    server = RunPy(tmp_path_factory.mktemp("run-py"), module_database_url)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def run_py(module_run_py: RunPy) -> RunPy:
    """The module's server, serving: a test that stopped it (to restart it) and failed
    before starting it again leaves it to the next test to start."""
    if not module_run_py.running():
        module_run_py.kill()
        module_run_py.start()
    return module_run_py


class Chromium:
    """One headless Chromium for the module, driven from a thread of its own.

    Playwright's sync API keeps an asyncio loop running in the thread that uses it, and the
    test fixtures run ``asyncio.run`` in the main thread: so the browser lives in one
    worker thread, and each test hands it a function of the browser (``run``).
    """

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="chromium")
        self._playwright, self.browser = self._thread.submit(self._launch).result()

    @staticmethod
    def _launch() -> tuple[Playwright, Browser]:
        # trio-asyncio's policy would make Playwright's loop a trio-asyncio one, which
        # cannot run nested; a plain asyncio policy, for this thread only.
        asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
        playwright = sync_playwright().start()
        return playwright, playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)

    def run(self, check: Callable[[Browser, RunPy], None], server: RunPy) -> None:
        self._thread.submit(check, self.browser, server).result()

    def close(self) -> None:
        def stop() -> None:
            self.browser.close()
            self._playwright.stop()

        self._thread.submit(stop).result()
        self._thread.shutdown()


@pytest.fixture(scope="module")
def chromium() -> Iterator[Chromium]:
    need_chromium()
    browser = Chromium()
    yield browser
    browser.close()


@dataclass
class Tab:
    """A page, the requests it tried beyond the server, and the CSP violations it logged."""

    page: Page
    blocked: list[str] = field(default_factory=list)
    csp_violations: list[str] = field(default_factory=list)


def new_tab(browser: Browser, server: RunPy) -> Tab:
    """A page in a fresh context that may reach the server and nothing else."""
    page = browser.new_context(viewport={"width": 1200, "height": 900}).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    tab = Tab(page)

    def only_the_server(route: Route) -> None:
        if urlsplit(route.request.url).netloc == f"127.0.0.1:{server.port}":
            route.continue_()
        else:
            tab.blocked.append(route.request.url)
            route.abort()

    def console(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            tab.csp_violations.append(message.text)

    page.route("**/*", only_the_server)
    page.on("console", console)
    return tab


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True)


@dataclass
class User:
    email: str
    user_id: str
    token: str


def signup(http: httpx.Client, email: str) -> User:
    """A user signed up and logged in, as ``email`` made unique (``ann@example.com`` becomes
    ``ann.<6 hex digits>@example.com``): the tests of a module share one server."""
    local, domain = email.split("@")
    email = f"{local}.{secrets.token_hex(3)}@{domain}"
    body = {"email": email, "password": PASSWORD}
    assert http.post("/api/v1/auth/signup", json=body).status_code == 201
    r = http.post("/api/v1/auth/login", json=body)
    assert r.status_code == 200, r.text
    return User(email, r.json()["user_id"], r.json()["access_token"])


def auth(user: User) -> dict[str, str]:
    return {"Authorization": f"Bearer {user.token}"}


def shared_project(http: httpx.Client, name: str) -> tuple[User, User, str]:
    """Ann and Bob signed up, and the id of project ``name``: Ann's, Bob a collaborator."""
    ann, bob = signup(http, "ann@example.com"), signup(http, "bob@example.com")
    r = http.post("/api/v1/projects/", json={"name": name}, headers=auth(ann))
    project_id: str = r.json()["id"]
    r = http.post(
        f"/api/v1/projects/{project_id}/collaborators",
        json={"email": bob.email},
        headers=auth(ann),
    )
    assert r.status_code == 201, r.text
    return ann, bob, project_id


def file_changes(http: httpx.Client, user: User, project_id: str) -> list[dict[str, Any]]:
    r = http.get(f"/api/v1/projects/{project_id}/events?since_seq=0&limit=1000", headers=auth(user))
    assert r.status_code == 200, r.text
    assert not r.json()["has_more"]
    return [e for e in r.json()["events"] if e["type"] == "FILE_CHANGE"]


def log_in(page: Page, server: RunPy, user: User, project_id: str) -> None:
    page.goto(f"{server.url}/demo")
    page.fill("#email", user.email)
    page.fill("#password", PASSWORD)
    page.click("#login")
    page.click(f"#projects button[data-project-id='{project_id}']")
    expect(page.locator("#status")).to_have_attribute("data-state", "open")


def send_edit(page: Page, path: str) -> None:
    page.fill("#file", path)
    page.click("#send-edit")


def test_the_demo_keeps_every_edit_exactly_once_across_a_server_restart(
    run_py: RunPy, chromium: Chromium
) -> None:
    chromium.run(demo_across_a_restart, run_py)


def demo_across_a_restart(browser: Browser, run_py: RunPy) -> None:
    with httpx.Client(base_url=run_py.url, verify=CLIENT_TLS) as http:
        ann, bob, project_id = shared_project(http, "Demo")

    tab_a, tab_b = new_tab(browser, run_py), new_tab(browser, run_py)
    a, b = tab_a.page, tab_b.page
    log_in(a, run_py, ann, project_id)
    log_in(b, run_py, bob, project_id)
    # Who is here, and where their cursor is, live.
    expect(a.locator(f"#presence li[data-user-id='{bob.user_id}']")).to_contain_text(bob.email)
    b.click("#editor")
    b.keyboard.type("one\ntwo")
    expect(a.locator("#cursors")).to_contain_text(f"{bob.email} at /src/app.py:2:4")

    for n in (1, 2, 3):
        send_edit(a, f"/e{n}")
    expect(a.locator("#pending")).to_have_text("0")

    run_py.stop()  # the page's socket closes (1001), reconnects find nobody listening
    expect(a.locator("#status")).to_have_attribute("data-state", "reconnecting")
    for n in (4, 5):
        send_edit(a, f"/e{n}")  # queued while the server is down
    expect(a.locator("#pending")).to_have_text("2")
    run_py.start()  # the same port, the same database
    # The pages retry on their backoff, which grew while the server was down (a slow
    # restart on a loaded machine: 4-8 s and more); it is capped at 30 s.
    expect(a.locator("#status")).to_have_attribute("data-state", "open", timeout=RECONNECT_MS)
    expect(b.locator("#status")).to_have_attribute("data-state", "open", timeout=RECONNECT_MS)
    expect(a.locator("#pending")).to_have_text("0")
    send_edit(a, "/e6")
    expect(a.locator("#pending")).to_have_text("0")

    paths = [f"/e{n}" for n in range(1, 7)]
    with httpx.Client(base_url=run_py.url, verify=CLIENT_TLS) as http:
        stored = file_changes(http, ann, project_id)
    assert [e["payload"]["file_path"] for e in stored] == paths  # once each, in order
    seqs = [str(e["seq"]) for e in stored]
    # Both pages saw each edit once, with the stored seq: B too resumed past the restart.
    for page in (a, b):
        log = page.locator("#log li[data-type='FILE_CHANGE']")
        expect(log).to_have_count(6)
        assert sorted(log.evaluate_all("items => items.map(i => i.dataset.seq)")) == sorted(seqs)
    assert tab_a.csp_violations == tab_b.csp_violations == []
    screenshot(a, "demo-owner")
    screenshot(b, "demo-collaborator")


def open_document(page: Page, path: str) -> None:
    page.fill("#doc-path", path)
    page.click("#open-doc")
    expect(page.locator("#doc-status")).to_have_attribute("data-state", "synced")


def test_the_demo_edits_a_live_document_together(run_py: RunPy, chromium: Chromium) -> None:
    chromium.run(shared_document, run_py)


def shared_document(browser: Browser, run_py: RunPy) -> None:
    with httpx.Client(base_url=run_py.url) as http:
        ann, bob, project_id = shared_project(http, "Notes")
        cat = signup(http, "cat@example.com")
        r = http.post(
            f"/api/v1/projects/{project_id}/collaborators",
            json={"email": cat.email, "role": "viewer"},
            headers=auth(ann),
        )
        assert r.status_code == 201, r.text

    tabs = {user.email: new_tab(browser, run_py) for user in (ann, bob, cat)}
    a, b, c = (tabs[user.email].page for user in (ann, bob, cat))
    for page, user in ((a, ann), (b, bob), (c, cat)):
        log_in(page, run_py, user, project_id)
        open_document(page, "/notes.md")
    expect(c.locator("#doc")).not_to_be_editable()
    expect(c.locator("#doc-mode")).to_contain_text("read-only")

    # Ann and Bob type at once, in turns of a few keys, each before the other's arrive.
    a.click("#doc")
    b.click("#doc")
    ann_typed, bob_typed = "Ann writes here. ", "Bob too! "
    for n in range(0, len(ann_typed), 4):
        a.keyboard.type(ann_typed[n : n + 4])
        b.keyboard.type(bob_typed[n : n + 4])
    merged = one_text(len(ann_typed + bob_typed), a, b, c)
    # Each typed at their own caret: both runs are whole, in one order or the other.
    assert merged in (ann_typed + bob_typed, bob_typed + ann_typed)
    # Each sees where the others are, the viewer too, named by the server.
    for page, other in ((a, bob), (a, cat), (b, ann), (c, ann)):
        expect(page.locator(f"#doc-peers li[data-user-id='{other.user_id}']")).to_contain_text(
            f"{other.email} at line 1"
        )
    caret = a.locator(f"#doc-overlay .remote-caret[data-user-id='{bob.user_id}']")
    expect(caret).to_have_attribute("data-name", bob.email)

    # The viewer types: nothing changes, on its page or anyone else's.
    c.click("#doc")
    c.keyboard.type("cat was here")
    c.keyboard.press("Backspace")
    expect(c.locator("#doc")).to_have_value(merged)
    a.keyboard.type("!")  # at Ann's caret, the end of her run
    merged = merged.replace(ann_typed, ann_typed + "!")
    assert one_text(len(merged), a, b, c) == merged
    screenshot(a, "shared-editor-owner")
    screenshot(c, "shared-editor-viewer")

    # Restart the server with only the viewer's page open (it cannot bring anything back):
    # the document is what PostgreSQL kept, and the viewer's page reconnects to it.
    a.context.close()
    b.context.close()
    run_py.stop()
    expect(c.locator("#doc-status")).to_have_attribute("data-state", "reconnecting")
    run_py.start()
    with httpx.Client(base_url=run_py.url) as http:
        r = http.get(f"/api/v1/projects/{project_id}/documents", headers=auth(ann))
        (room,) = [d["room"] for d in r.json()["documents"]]
        r = http.get(f"/api/v1/projects/{project_id}/documents/{room}/text", headers=auth(ann))
        assert r.json()["text"] == merged
    expect(c.locator("#doc-status")).to_have_attribute("data-state", "synced", timeout=RECONNECT_MS)
    d = new_tab(browser, run_py).page
    log_in(d, run_py, ann, project_id)
    open_document(d, "/notes.md")
    expect(d.locator("#doc")).to_have_value(merged)
    d.click("#doc")
    d.keyboard.press("Control+End")
    d.keyboard.type(" Later.")
    expect(c.locator("#doc")).to_have_value(merged + " Later.")
    # Deleted by its owner: the pages stop (no reconnecting to a document that is gone).
    with httpx.Client(base_url=run_py.url) as http:
        r = http.delete(f"/api/v1/projects/{project_id}/documents/{room}", headers=auth(ann))
        assert r.status_code == 204, r.text
    for page in (c, d):
        expect(page.locator("#doc-status")).to_have_text("closed (4013)")
    expect(d.locator("#doc")).not_to_be_editable()
    for tab in tabs.values():
        assert tab.blocked == tab.csp_violations == []


def one_text(length: int, *pages: Page) -> str:
    """The text every page's editor shows, once each shows ``length`` characters: the
    same on every page."""
    for page in pages:
        expect(page.locator("#doc")).to_have_value(re.compile(f"^.{{{length}}}$", re.DOTALL))
    texts = {page.locator("#doc").input_value() for page in pages}
    assert len(texts) == 1, texts
    return texts.pop()


def test_the_docs_render_offline(run_py: RunPy, chromium: Chromium) -> None:
    chromium.run(docs_offline, run_py)


def docs_offline(browser: Browser, run_py: RunPy) -> None:
    tab = new_tab(browser, run_py)
    page = tab.page
    page.goto(f"{run_py.url}/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("atrium")
    spec = httpx.get(f"{run_py.url}/openapi.json", verify=CLIENT_TLS).json()
    documented = sum(len(methods) for methods in spec["paths"].values())
    # Every operation of the document is listed (Swagger UI renders them all at once).
    expect(page.locator(".opblock")).to_have_count(documented)
    login = page.locator(".opblock", has=page.locator("[data-path='/api/v1/auth/login']"))
    login.locator(".opblock-summary").click()  # an operation opens: schemas, examples
    expect(login.locator(".opblock-body .responses-wrapper")).to_be_visible()
    assert tab.blocked == []  # nothing even tried to leave
    assert tab.csp_violations == []
    screenshot(page, "docs")


# Runs in the page: a client whose first socket never delivers the ACKs of three edits and
# drops once the server has stored them; the client must resend them after reconnecting.
RESEND = """
async ({ projectId, token }) => {
  const { AtriumClient } = await import("/static/atrium.js");
  const sockets = [];
  const sent = [];
  class FlakyWebSocket extends WebSocket {
    constructor(url) {
      super(url);
      this.index = sockets.push(this) - 1;
      this.stored = 0;
    }
    send(data) {
      sent.push([this.index, JSON.parse(data)]);
      super.send(data);
    }
    set onmessage(handler) {
      this.deliver = (frame) => handler({ data: JSON.stringify(frame) });
      super.onmessage = (message) => {
        // Socket 1 (socket 0 had the refused token) goes dark once it has sent the edits:
        // nothing reaches the client, and it drops when the server has stored all three.
        const mine = ([index, frame]) => index === 1 && frame.type === "FILE_CHANGE";
        if (this.index !== 1 || !sent.some(mine)) return handler(message);
        const frames = [].concat(JSON.parse(message.data));
        this.stored += frames.filter((f) => f.type === "FILE_CHANGE").length;
        if (this.stored === 3) this.close();
      };
    }
  }
  const reasons = [];
  const events = [];
  const client = new AtriumClient({
    projectId,
    getToken: (reason) => {
      reasons.push(reason);
      return reasons.length === 1 ? "not-a-token" : token; // refused first: 4001
    },
    WebSocket: FlakyWebSocket,
    initialDelayMs: 50,
  });
  client.on("event", (e) => events.push([e.seq, e.type, e.file_path ?? null]));
  const opened = () => new Promise((resolve) => {
    const off = client.on("state", (s) => s.state === "open" && (off(), resolve()));
  });
  let ready = opened();
  client.connect();
  await ready;
  ready = opened();
  const edits = ["/r1", "/r2", "/r3"].map((path, n) =>
    client.edit(path, { lines_added: n, lines_removed: 0, change_type: "modification" }));
  await ready; // reconnected after the drop
  edits.push(client.edit("/r4", { lines_added: 4, lines_removed: 0, change_type: "added" }));
  const timeout = new Promise((_, reject) => setTimeout(() => reject(new Error("no ACK")), 10000));
  const acks = await Promise.race([Promise.all(edits), timeout]);

  // TOKEN_EXPIRING (played into the socket): a token from the callback goes to the server.
  const renewed = new Promise((resolve) =>
    client.on("frame", (f) => f.type === "AUTH_OK" && resolve(f)));
  sockets[2].deliver({ type: "TOKEN_EXPIRING", expires_at: "2030-01-01T00:00:00Z" });
  const authOk = await renewed;
  client.close();

  // A project that is not ours: 4004, and the client stops (no retry, the edit is refused).
  const ghost = new AtriumClient({ projectId: crypto.randomUUID(), getToken: () => token,
                                    WebSocket: FlakyWebSocket });
  const stopped = new Promise((resolve) =>
    ghost.on("state", (s) => s.state === "closed" && resolve(s)));
  const refused = ghost.edit("/nowhere", {}).catch((e) => e.code);
  const socketsBefore = sockets.length;
  ghost.connect();
  const end = await stopped;
  return { acks, events, reasons, sent, authOk, sockets: sockets.length, lastSeq: client.lastSeq,
           ghost: { code: end.code, sockets: sockets.length - socketsBefore,
                    edit: await refused, state: ghost.state } };
}
"""


def test_atrium_js_resends_edits_whose_ack_never_came(run_py: RunPy, chromium: Chromium) -> None:
    chromium.run(resend_unacked_edits, run_py)


def resend_unacked_edits(browser: Browser, run_py: RunPy) -> None:
    with httpx.Client(base_url=run_py.url, verify=CLIENT_TLS) as http:
        ann = signup(http, "ann@example.com")
        project_id = http.post("/api/v1/projects/", json={"name": "P"}, headers=auth(ann)).json()[
            "id"
        ]
        page = new_tab(browser, run_py).page
        page.goto(f"{run_py.url}/demo")
        result = page.evaluate(RESEND, {"projectId": project_id, "token": ann.token})
        stored = file_changes(http, ann, project_id)

    # The token callback was asked again after the server refused the first token, and for
    # a fresh one on TOKEN_EXPIRING, which went to the server and was accepted.
    assert result["reasons"] == ["connect", "rejected", "connect", "expiring"]
    assert result["authOk"]["type"] == "AUTH_OK"
    assert [2, {"type": "AUTH", "token": ann.token}] in result["sent"]
    by_socket: dict[int, list[dict[str, Any]]] = {}
    for index, frame in result["sent"]:
        by_socket.setdefault(index, []).append(frame)
    edits = [[f for f in by_socket[i] if f["type"] == "FILE_CHANGE"] for i in (1, 2)]
    # Socket 0 had the bad token; socket 1 sent three edits and went dark before the ACKs;
    # socket 2 resumed from the last seq it had and sent the same three again, same ids.
    assert by_socket[2][0]["type"] == "AUTH" and by_socket[2][0]["since_seq"] > 0
    assert [e["id"] for e in edits[1][:3]] == [e["id"] for e in edits[0]]
    assert [e["file_path"] for e in edits[1]] == ["/r1", "/r2", "/r3", "/r4"]
    # Stored once each; every ACK names the stored event; the replay delivered them once.
    assert [e["payload"]["file_path"] for e in stored] == ["/r1", "/r2", "/r3", "/r4"]
    assert [a["seq"] for a in result["acks"]] == [e["seq"] for e in stored]
    assert [a["id"] for a in result["acks"]] == [e["id"] for e in edits[1]]
    delivered = [(seq, path) for seq, kind, path in result["events"] if kind == "FILE_CHANGE"]
    assert delivered == [(e["seq"], e["payload"]["file_path"]) for e in stored]
    seqs = [seq for seq, _, _ in result["events"]]
    assert seqs == sorted(set(seqs))  # no duplicate, in order
    assert result["ghost"] == {"code": 4004, "sockets": 1, "edit": "closed_4004", "state": "closed"}
    screenshot(page, "atrium-js-resend")


# Runs in the page: two edits reach the server but their ACKs never reach the client, and a
# third is made while the client is closed (the server is out of reach, say). Then the tab
# reloads (below).
BEFORE_RELOAD = """
async ({ projectId, token }) => {
  const { AtriumClient, pendingKey } = await import("/static/atrium.js");
  let acked = 0;
  let bothStored;
  const stored = new Promise((resolve) => (bothStored = resolve));
  class NoAcks extends WebSocket {
    set onmessage(handler) {
      super.onmessage = (message) => {
        const frames = [].concat(JSON.parse(message.data));
        const acks = frames.filter((f) => f.type === "ACK").length;
        if (acks === 0) return handler(message);
        acked += acks; // swallowed: the client never learns that these were stored
        if (acked === 2) bothStored();
      };
    }
  }
  const client = new AtriumClient({ projectId, getToken: () => token, WebSocket: NoAcks });
  const open = new Promise((resolve) => client.on("state", (s) => s.state === "open" && resolve()));
  client.connect();
  await open;
  client.edit("/p1", { lines_added: 1, lines_removed: 0, change_type: "modification" });
  client.edit("/p2", { lines_added: 2, lines_removed: 0, change_type: "modification" });
  await stored;
  client.close();
  client.edit("/p3", { lines_added: 3, lines_removed: 0, change_type: "added" });
  return { pending: client.pendingEdits,
           kept: JSON.parse(sessionStorage.getItem(pendingKey(projectId))) };
}
"""

# After the reload: a client for the project (first another user's, who must not send
# them, then the author's) picks up the kept edits and sends them until each is ACKed.
AFTER_RELOAD = """
async ({ projectId, token }) => {
  const { AtriumClient, pendingKey } = await import("/static/atrium.js");
  const client = new AtriumClient({ projectId, getToken: () => token });
  const restored = client.pendingEdits;
  const acks = [];
  const open = new Promise((resolve) => client.on("state", (s) => s.state === "open" && resolve()));
  const done = new Promise((resolve) => client.on("ack", (ack) => {
    acks.push(ack);
    if (client.pendingEdits === 0) resolve();
  }));
  client.connect();
  await open;
  const pendingWhenOpen = client.pendingEdits;
  if (pendingWhenOpen > 0) {
    const timeout = new Promise((_, no) => setTimeout(() => no(new Error("no ACK")), 10000));
    await Promise.race([done, timeout]);
  }
  client.close();
  return { restored, pendingWhenOpen, acks,
           kept: JSON.parse(sessionStorage.getItem(pendingKey(projectId))) };
}
"""


def test_atrium_js_pending_edits_survive_a_reload(run_py: RunPy, chromium: Chromium) -> None:
    chromium.run(pending_across_a_reload, run_py)


def pending_across_a_reload(browser: Browser, run_py: RunPy) -> None:
    with httpx.Client(base_url=run_py.url, verify=CLIENT_TLS) as http:
        ann, bob, project_id = shared_project(http, "Reload")
        page = new_tab(browser, run_py).page
        page.goto(f"{run_py.url}/demo")
        before = page.evaluate(BEFORE_RELOAD, {"projectId": project_id, "token": ann.token})
        assert before["pending"] == 3
        kept = before["kept"]
        assert [entry["user"] for entry in kept] == [ann.user_id] * 3
        assert [json.loads(entry["frame"])["file_path"] for entry in kept] == ["/p1", "/p2", "/p3"]
        # Two are stored already, though their author never heard.
        assert [e["payload"]["file_path"] for e in file_changes(http, ann, project_id)] == [
            "/p1",
            "/p2",
        ]

        page.reload()
        # Bob, in the same tab: Ann's edits are not his to send; they stay kept.
        as_bob = page.evaluate(AFTER_RELOAD, {"projectId": project_id, "token": bob.token})
        assert (as_bob["restored"], as_bob["pendingWhenOpen"], as_bob["acks"]) == (3, 0, [])
        assert as_bob["kept"] == kept
        page.reload()
        as_ann = page.evaluate(AFTER_RELOAD, {"projectId": project_id, "token": ann.token})
        stored = file_changes(http, ann, project_id)

    assert (as_ann["restored"], as_ann["pendingWhenOpen"], as_ann["kept"]) == (3, 3, None)
    # Stored exactly once each, all Ann's; the resent edits were ACKed with their first seq.
    assert [e["payload"]["file_path"] for e in stored] == ["/p1", "/p2", "/p3"]
    assert [e["actor_id"] for e in stored] == [ann.user_id] * 3
    acks = {a["id"]: a["seq"] for a in as_ann["acks"]}
    assert acks == {entry["id"]: event["seq"] for entry, event in zip(kept, stored, strict=True)}
