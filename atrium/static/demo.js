// The /demo page: log in over REST, pick a project, and live in its workspace with atrium.js;
// open one of its live documents in a shared editor (shared-editor.js, y-websocket).
import { AtriumClient } from "/static/atrium.js";
import { openSharedEditor } from "/static/shared-editor.js";

const $ = (id) => document.getElementById(id);
const session = { user: null, access: null, refresh: null };
let client = null;
let project = null;

/** A REST call with the access token; one refresh and a retry when it has expired. */
async function api(path, { method = "GET", body, retry = true } = {}) {
  const headers = { "Content-Type": "application/json" };
  if (session.access) headers.Authorization = `Bearer ${session.access}`;
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = response.status === 204 ? null : await response.json();
  if (response.status === 401 && retry && session.refresh) {
    await refreshTokens();
    return api(path, { method, body, retry: false });
  }
  if (!response.ok) throw new Error(data?.error?.message ?? `HTTP ${response.status}`);
  return data;
}

async function refreshTokens() {
  const response = await fetch("/api/v1/auth/refresh", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ refresh_token: session.refresh }),
  });
  const data = await response.json();
  if (!response.ok) throw new Error(data?.error?.message ?? `HTTP ${response.status}`);
  session.access = data.access_token;
  session.refresh = data.refresh_token;
}

async function logIn(email, password) {
  const data = await api("/api/v1/auth/login", { method: "POST", body: { email, password } });
  session.user = { id: data.user_id, email };
  session.access = data.access_token;
  session.refresh = data.refresh_token;
  $("whoami").textContent = email;
  $("login-view").hidden = true;
  await showProjects();
}

async function showProjects() {
  const { projects } = await api("/api/v1/projects/?limit=100");
  const list = $("projects");
  list.replaceChildren(
    ...projects.map((project) => {
      const button = document.createElement("button");
      button.textContent = `${project.name} (${project.role})`;
      button.dataset.projectId = project.id;
      button.addEventListener("click", () => openWorkspace(project));
      const item = document.createElement("li");
      item.append(button);
      return item;
    }),
  );
  $("projects-view").hidden = false;
}

function nameOf(userId, presence) {
  if (userId === session.user.id) return `${session.user.email} (you)`;
  return presence?.get(userId)?.email ?? emails.get(userId) ?? userId.slice(0, 8);
}

const emails = new Map();
const cursors = new Map();

function openWorkspace(chosen) {
  project = chosen;
  client?.close();
  closeDocument();
  $("projects-view").hidden = true;
  $("workspace-view").hidden = false;
  $("project-name").textContent = project.name;
  $("log").replaceChildren();
  cursors.clear();

  client = new AtriumClient({
    projectId: project.id,
    // "connect": the token we hold; "expiring" / "rejected": a fresh one.
    getToken: async (reason) => {
      if (reason !== "connect") await refreshTokens();
      return session.access;
    },
  });
  client.on("state", ({ state, code, delayMs }) => {
    const status = $("status");
    status.dataset.state = state;
    status.textContent =
      state === "reconnecting"
        ? `reconnecting in ${(delayMs / 1000).toFixed(1)} s (closed ${code})`
        : state + (code ? ` (${code})` : "");
    updatePending();
  });
  client.on("event", (event) => {
    if (event.email) emails.set(event.user_id, event.email);
    const item = document.createElement("li");
    item.dataset.seq = event.seq;
    item.dataset.type = event.type;
    const what =
      event.file_path ?? event.path ?? event.message ?? JSON.stringify(event.payload ?? "");
    item.textContent = `#${event.seq} ${event.type} ${nameOf(event.user_id)} ${what}`;
    $("log").prepend(item);
    $("last-seq").textContent = client.lastSeq;
  });
  client.on("presence", (presence) => {
    $("presence").replaceChildren(
      ...[...presence.values()].map((user) => {
        const item = document.createElement("li");
        item.dataset.userId = user.user_id;
        item.textContent = `${nameOf(user.user_id, presence)} · ${user.connections} connection(s)`;
        return item;
      }),
    );
  });
  client.on("cursor", ({ user_id, position }) => {
    cursors.set(user_id, position);
    $("cursors").replaceChildren(
      ...[...cursors].map(([userId, p]) => {
        const item = document.createElement("li");
        item.textContent = `${nameOf(userId)} at ${p.file}:${p.line}:${p.column}`;
        return item;
      }),
    );
  });
  client.on("resync", () => {
    const item = document.createElement("li");
    item.textContent = "(events were missed and are too old to replay: reload the page)";
    $("log").prepend(item);
  });
  client.on("error", (error) => console.warn("atrium:", error.code, error.message));
  client.on("ack", () => updatePending());
  client.connect();
  updatePending(); // edits a reload left pending are sent once connected
}

function updatePending() {
  $("pending").textContent = client?.pendingEdits ?? 0;
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("login-error").textContent = "";
  try {
    await logIn($("email").value, $("password").value);
  } catch (error) {
    $("login-error").textContent = error.message;
  }
});

$("signup").addEventListener("click", async () => {
  $("login-error").textContent = "";
  const email = $("email").value;
  const password = $("password").value;
  try {
    await api("/api/v1/auth/signup", { method: "POST", body: { email, password } });
    await logIn(email, password);
  } catch (error) {
    $("login-error").textContent = error.message;
  }
});

$("new-project-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const project = await api("/api/v1/projects/", {
    method: "POST",
    body: { name: $("new-project").value },
  });
  $("new-project").value = "";
  openWorkspace(project);
});

$("edit-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const changes = {
    lines_added: Number($("lines-added").value),
    lines_removed: Number($("lines-removed").value),
    change_type: "modification",
  };
  client
    .edit($("file").value, changes)
    .catch((error) => console.warn("edit refused:", error.code, error.message))
    .finally(updatePending);
  updatePending();
});

// Share the caret as a cursor, at most ten times a second (the server allows 50 frames/s).
let cursorTimer = null;
function shareCursor() {
  if (cursorTimer !== null) return;
  cursorTimer = setTimeout(() => {
    cursorTimer = null;
    const editor = $("editor");
    const before = editor.value.slice(0, editor.selectionStart).split("\n");
    client?.cursor($("file").value, before.length, before.at(-1).length + 1);
  }, 100);
}
for (const name of ["keyup", "click", "select"]) $("editor").addEventListener(name, shareCursor);

// The shared editor: one live document of the project at a time.
let editor = null;
let opening = 0; // the latest Open click wins over slower ones still on their way

function closeDocument() {
  opening++;
  editor?.close();
  editor = null;
  $("doc").disabled = true;
  $("doc-peers").replaceChildren();
  showDocumentStatus("closed");
  $("doc-status").textContent = "not open";
  $("doc-mode").textContent = "";
}

function showDocumentStatus(state, code) {
  const status = $("doc-status");
  status.dataset.state = state;
  status.textContent = state + (code ? ` (${code})` : "");
}

function showMode(role) {
  const editable = role !== "viewer";
  editor?.setEditable(editable);
  $("doc-mode").textContent = editable ? "" : "read-only: you are a viewer";
}

async function openDocument(path) {
  closeDocument();
  const mine = opening;
  const here = project;
  const getTicket = () =>
    api(`/api/v1/projects/${here.id}/documents/tickets`, { method: "POST", body: { path } });
  try {
    const opened = await openSharedEditor({
      textarea: $("doc"),
      overlay: $("doc-overlay"),
      getTicket,
      editable: here.role !== "viewer",
      onStatus: showDocumentStatus,
      onPeers: (peers) => {
        $("doc-peers").replaceChildren(
          ...peers.map((peer) => {
            const item = document.createElement("li");
            item.dataset.userId = peer.userId;
            item.style.setProperty("--peer", peer.colour);
            const selected = peer.selected ? `, ${peer.selected} selected` : "";
            item.textContent = `${peer.name} at line ${peer.line}, column ${peer.column}${selected}`;
            return item;
          }),
        );
      },
      onClose: async (code) => {
        if (code !== 4014) return; // role_changed: editable or not, from now on
        try {
          here.role = (await api(`/api/v1/projects/${here.id}`)).role;
        } catch {
          return; // no longer a member: the next connection is refused (4004) and stops
        }
        if (editor && mine === opening) showMode(here.role);
      },
    });
    if (mine !== opening) {
      opened.close();
      return;
    }
    editor = opened;
    $("doc").disabled = false;
    showMode(here.role);
  } catch (error) {
    if (mine === opening) $("doc-status").textContent = `could not open: ${error.message}`;
  }
}

$("doc-form").addEventListener("submit", (event) => {
  event.preventDefault();
  openDocument($("doc-path").value);
});
