// The operator console: polls the operator endpoints with the token in an Authorization
// header (never in a URL) and renders what they say with DOM nodes and textContent only.
const TOKEN_KEY = "atrium.operatorToken";
const POLL_MS = 2000;
const TREE_CHILDREN_SHOWN = 50;

const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem(TOKEN_KEY);
let timer = null;
let previous = null; // the last metrics summary and when it came, for rates

/** An element with attributes and children (strings become text nodes, never HTML). */
function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null) continue;
    if (name === "className") node.className = value;
    else if (name.startsWith("data-")) node.setAttribute(name, String(value));
    else node[name] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === "string" || typeof child === "number" ? String(child) : child);
  }
  return node;
}

class Refused extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** A JSON call to an operator endpoint; throws Refused on 401/403, Error otherwise. */
async function call(path, method = "GET") {
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(path, { method, headers, cache: "no-store" });
  const body = await response.json().catch(() => null);
  if (response.status === 401 || response.status === 403) {
    throw new Refused(response.status, body?.error?.code, body?.error?.message ?? "refused");
  }
  if (!response.ok) throw new Error(body?.error?.message ?? `HTTP ${response.status}`);
  return body;
}

function setStatus(state, text) {
  $("status").dataset.state = state;
  $("status").textContent = text;
}

function askForToken(message) {
  clearTimeout(timer);
  timer = null;
  $("console-view").hidden = true;
  $("forget-token").hidden = true;
  $("token-view").hidden = false;
  if (message) $("token-message").textContent = message;
  $("token").focus();
}

async function poll() {
  clearTimeout(timer);
  try {
    const [tree, workspaces, documents, jobs, metrics] = await Promise.all([
      call("/health/supervisor"),
      call("/ops/workspaces"),
      call("/ops/documents"),
      call("/ops/jobs"),
      call("/ops/metrics"),
    ]);
    $("token-view").hidden = true;
    $("console-view").hidden = false;
    $("forget-token").hidden = !token;
    renderMetrics(metrics);
    renderJobs(jobs);
    renderWorkspaces(workspaces);
    renderDocuments(documents);
    renderTree(tree);
    setStatus("live", `live · ${new Date().toLocaleTimeString()}`);
  } catch (error) {
    if (error instanceof Refused) {
      setStatus("refused", "token refused");
      if (error.code === "operator_disabled") {
        askForToken("The server has no ADMIN_TOKEN: set one to use the console.");
      } else {
        askForToken(token ? "That token was refused: enter the server's ADMIN_TOKEN." : null);
      }
      return;
    }
    setStatus("error", `no answer (${error.message}); retrying`);
  }
  timer = setTimeout(poll, POLL_MS);
}

// -- metrics --------------------------------------------------------------------------------

function ms(seconds) {
  return seconds === null || seconds === undefined ? "-" : `${(seconds * 1000).toFixed(1)} ms`;
}

function figure(label, value, key) {
  return el("div", { "data-figure": key }, el("dt", {}, label), el("dd", {}, String(value ?? "-")));
}

function renderMetrics(m) {
  const now = performance.now();
  let rate = "-";
  let errorRate = "-";
  if (previous) {
    const seconds = (now - previous.at) / 1000;
    rate = `${((m.http.requests - previous.m.http.requests) / seconds).toFixed(1)}/s`;
    errorRate = `${((m.http.server_errors - previous.m.http.server_errors) / seconds).toFixed(2)}/s`;
  }
  previous = { m, at: now };
  const latency = m.http.latency_seconds ?? {};
  const ratio = m.project_cache.hit_ratio;
  const open = Object.values(m.websockets.open).reduce((a, b) => a + b, 0);
  const waiting = ["queued", "failed"].reduce((sum, s) => sum + (m.jobs.by_state[s] ?? 0), 0);
  $("metrics").replaceChildren(
    figure("HTTP requests", m.http.requests, "requests"),
    figure("Request rate", rate, "request-rate"),
    figure("5xx / 4xx", `${m.http.server_errors} / ${m.http.client_errors}`, "errors"),
    figure("5xx rate", errorRate, "error-rate"),
    figure("Latency p50", ms(latency.p50), "p50"),
    figure("Latency p95", ms(latency.p95), "p95"),
    figure("Latency p99", ms(latency.p99), "p99"),
    figure("WebSockets open", open, "websockets"),
    figure("Workspaces running", m.workspaces.running, "workspaces"),
    figure("Workspace mailboxes", m.workspaces.mailbox_depth, "mailbox"),
    figure("Live documents", m.documents.running, "documents"),
    figure(
      "DB pool in use",
      m.database.pool_in_use === null ? "-" : `${m.database.pool_in_use} / ${m.database.pool_connections}`,
      "pool",
    ),
    figure("DB query p95", ms(m.database.query_latency_seconds?.p95), "db-p95"),
    figure("Cache hit ratio", ratio === null ? "-" : `${(ratio * 100).toFixed(1)} %`, "cache"),
    figure("Jobs waiting", waiting, "jobs-waiting"),
    figure("Restarts / escalations", `${m.supervision.restarts} / ${m.supervision.escalations}`, "restarts"),
  );
}

// -- jobs -----------------------------------------------------------------------------------

function renderJobs(jobs) {
  const counts = Object.entries(jobs.by_state).map(([state, n]) => figure(state, n, `jobs-${state}`));
  counts.push(figure("completed (5 min)", jobs.completed_recent, "jobs-completed-recent"));
  $("job-counts").replaceChildren(...counts);
  $("dead-empty").hidden = jobs.dead.length > 0;
  $("dead-jobs").hidden = jobs.dead.length === 0;
  $("dead-jobs").tBodies[0].replaceChildren(
    ...jobs.dead.map((job) => {
      const retry = el("button", { type: "button", className: "retry" }, "Retry");
      retry.addEventListener("click", () => retryJob(job.job_id, retry));
      return el(
        "tr",
        { "data-job-id": job.job_id },
        el("td", { className: "id" }, job.job_id),
        el("td", {}, job.task_name),
        el("td", { className: "id" }, job.project_id ?? "-"),
        el("td", { className: "id" }, job.user_id),
        el("td", {}, job.completed_at ? new Date(job.completed_at).toLocaleString() : "-"),
        el("td", { className: "num" }, job.retry_count + 1), // attempts that counted
        el("td", { className: "failure" }, job.error ?? ""),
        el("td", {}, retry),
      );
    }),
  );
}

async function retryJob(jobId, button) {
  button.disabled = true;
  $("job-message").textContent = "";
  try {
    await call(`/ops/jobs/${encodeURIComponent(jobId)}/retry`, "POST");
  } catch (error) {
    $("job-message").textContent = `Retry of ${jobId} failed: ${error.message}`;
    button.disabled = false;
  }
  poll();
}

// -- live documents -------------------------------------------------------------------------

function renderDocuments(body) {
  const plural = body.peers === 1 ? "" : "s";
  $("document-total").textContent = `(${body.total} open, ${body.peers} connection${plural})`;
  $("documents-empty").hidden = body.total > 0;
  $("documents").hidden = body.total === 0;
  $("documents").tBodies[0].replaceChildren(
    ...body.documents.map((d) =>
      el(
        "tr",
        { "data-document-id": d.document_id },
        el("td", { className: "id" }, d.document_id),
        el("td", { className: "id" }, d.project_id),
        el("td", {}, d.path),
        el("td", { className: "num" }, `${d.peers} (${d.users} user${d.users === 1 ? "" : "s"})`),
        el("td", { className: "num" }, d.seq),
        el("td", { className: "num" }, d.snapshot_seq),
        el("td", { className: "num" }, `${d.stored_bytes} B`),
        el("td", { className: "num" }, d.mailbox_depth),
      ),
    ),
  );
}

// -- workspaces -----------------------------------------------------------------------------

function renderWorkspaces(body) {
  const plural = body.connections === 1 ? "" : "s";
  $("workspace-total").textContent = `(${body.total} open, ${body.connections} connection${plural})`;
  $("workspaces-empty").hidden = body.total > 0;
  $("workspaces").hidden = body.total === 0;
  $("workspaces").tBodies[0].replaceChildren(
    ...body.workspaces.map((w) =>
      el(
        "tr",
        { "data-project-id": w.project_id },
        el("td", { className: "id" }, w.project_id),
        el("td", { className: "num" }, w.connections),
        el(
          "td",
          {},
          el(
            "ul",
            { className: "users" },
            ...w.users.map((u) =>
              el(
                "li",
                { "data-user-id": u.user_id },
                `${u.email} (${u.role}, ${u.connections} connection${u.connections === 1 ? "" : "s"})`,
              ),
            ),
          ),
        ),
        el("td", { className: "num" }, w.seq),
        el("td", { className: "num" }, w.mailbox_depth),
      ),
    ),
  );
}

// -- supervision tree -----------------------------------------------------------------------

function renderTree(body) {
  const contained = Object.entries(body.contained_failures)
    .map(([kind, n]) => `${kind}: ${n}`)
    .join(", ");
  $("contained").textContent = `Contained failures: ${contained || "none"}`;
  const root = body.supervisor;
  $("tree").replaceChildren(
    root
      ? el(
          "ul",
          {},
          el(
            "li",
            { "data-child": root.name },
            el("strong", {}, root.name),
            " ",
            el("span", { className: "state", "data-state": root.state }, root.state),
            el("span", { className: "meta" }, ` ${root.strategy}${root.healthy ? "" : " · unhealthy"}`),
            childList(root),
          ),
        )
      : "",
  );
}

function childList(sup) {
  const items = sup.children.slice(0, TREE_CHILDREN_SHOWN).map(childItem);
  const hidden = sup.children.length - items.length;
  if (hidden > 0) items.push(el("li", { className: "meta" }, `… and ${hidden} more`));
  return el("ul", {}, ...items);
}

function childItem(child) {
  const facts = [child.restart, `restarts ${child.restart_count}`];
  if (child.kind === "supervisor") facts.push(`escalations ${child.escalation_count}`);
  if (child.mailbox_depth !== null) facts.push(`mailbox ${child.mailbox_depth}`);
  if (child.uptime !== null) facts.push(`up ${Math.round(child.uptime)} s`);
  if (child.supervisor) facts.push(child.supervisor.strategy);
  const failure = child.last_failure;
  return el(
    "li",
    { "data-child": child.name },
    el(child.kind === "supervisor" ? "strong" : "span", {}, child.name),
    " ",
    el("span", { className: "state", "data-state": child.state }, child.state),
    el("span", { className: "meta" }, ` ${facts.join(" · ")}`),
    failure
      ? el("div", { className: "failure" }, `last failure: ${failure.type}: ${failure.message} (${failure.at})`)
      : null,
    child.supervisor ? childList(child.supervisor) : null,
  );
}

// -- start ----------------------------------------------------------------------------------

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  token = $("token").value.trim();
  $("token").value = "";
  sessionStorage.setItem(TOKEN_KEY, token);
  setStatus("idle", "connecting");
  poll();
});

$("forget-token").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  token = null;
  askForToken("Token forgotten. Enter the server's ADMIN_TOKEN.");
});

// Without a stored token, try once anyway: in development the endpoints need none.
poll();
