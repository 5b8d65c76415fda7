// The peerdrive dashboard: renders what /api/events streams; acts through /api/pin etc.
// No framework, no build step. Every text from the node goes in through textContent.
"use strict";

const TOKEN = document.querySelector('meta[name="peerdrive-token"]').content;
const q = (p) => `${p}${p.includes("?") ? "&" : "?"}token=${encodeURIComponent(TOKEN)}`;
const $ = (id) => document.getElementById(id);
let source = null;
let currentPath = null;  // the folder shown in the file browser
let copies = {};         // path -> copies, from the slower /api/tree?copies=1
let busy = {};           // path -> action in flight

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return e;
}

function size(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
}
const rate = (n) => (n ? `${size(n)}/s` : "—");
const short = (id) => (id ? id.slice(0, 12) : "—");

function ago(t, now) {
  if (!t) return "—";
  const s = Math.max(0, Math.round(now - t));
  if (s < 2) return "now";
  if (s < 120) return `${s} s ago`;
  if (s < 7200) return `${Math.round(s / 60)} min ago`;
  return new Date(t * 1000).toLocaleString();
}

// Rows carry data-key (which thing) and data-sig (its data): a live update replaces only
// the rows whose data changed, so focus, hover and a pending click survive it.
function replaceRows(tbody, rows, empty, cols) {
  if (!rows.length) rows = [el("tr", { "data-key": "empty", "data-sig": empty },
                              el("td", { colspan: cols }, empty))];
  const cur = [...tbody.children];
  if (cur.length === rows.length && cur.every((r, i) => r.dataset.key === rows[i].dataset.key)) {
    cur.forEach((r, i) => { if (r.dataset.sig !== rows[i].dataset.sig) r.replaceWith(rows[i]); });
  } else {
    tbody.replaceChildren(...rows);
  }
}
const keyed = (key, data, ...cells) => el("tr", { "data-key": key, "data-sig": JSON.stringify(data) },
                                          ...cells);

const SAFETY = { red: "only here or nowhere whole", amber: "one other copy",
                 green: "two or more copies, one always on" };

function stateCell(st) {
  const pct = st.percent ?? (st.state === "device" ? 100 : 0);
  const td = el("td", { "data-state": st.state, "data-percent": pct });
  const pinning = st.pinned && st.state !== "device";
  const counting = st.complete === false;  // the folder's first figures: still counting
  td.append(el("span", { class: `state-${st.state}` },
               counting ? "counting" : pinning ? "pinning" : st.state || "—"));
  if (st.state && st.kind !== "link") {
    td.append(" ", el("progress", { max: 100, value: pct, "aria-label": `${pct}% on this device` }),
              ` ${pct}%`);
  }
  return td;
}

// -- drives -------------------------------------------------------------------------
function renderDrives(snap) {
  const rows = snap.drives.map((d) => el("tr", { "data-drive": d.drive, "data-key": d.drive,
                                                 "data-sig": JSON.stringify(d) },
    el("td", {}, el("span", { class: `light ${d.safety}`, role: "img",
                                 "aria-label": `${d.safety}: ${SAFETY[d.safety]}` }), d.safety),
    el("td", { class: "id", title: d.drive }, short(d.drive),
       d.published_here ? " (published here)" : ""),
    el("td", { class: "num" }, d.seq ?? "—"),
    el("td", {}, d.mountpoint || "not mounted"),
    el("td", { class: "num" }, size(d.size_bytes)),
    el("td", { class: "num" }, d.cached_bytes !== undefined
      ? `${size(d.cached_bytes)} (${d.percent}%)` : (d.state === "device" ? "all"
        : (d.missing_blocks != null ? `${d.missing_blocks} blocks missing` : "—"))),
    el("td", {}, d.pinned === undefined ? "—" : (d.pinned ? "yes" : "no")),
    el("td", { class: "num" }, d.copies ?? "…"),
    el("td", {}, [...(d.hosted ? ["this node"] : []),
                  ...d.hosts.map((h) => h.addr || h.node_id || h)].join(", ") || "none"),
    el("td", {}, d.mirrors.length ? d.mirrors.join(", ") : "none")));
  replaceRows($("drives-body"), rows, "no drives yet: publish or mount one", 10);
}

// -- devices and peers ------------------------------------------------------------------
function renderNodes(snap) {
  const now = snap.time;
  replaceRows($("nodes-body"), snap.nodes.map((n) => keyed(n.pid, [n, ago(n.last_seen, now)],
    el("td", {}, `${n.role} (pid ${n.pid})`), el("td", { class: "id", title: n.node_id }, short(n.node_id)),
    el("td", { class: "num" }, n.port), el("td", {}, ago(n.last_seen, now)),
    el("td", { class: "num" }, size(n.bytes_in)), el("td", { class: "num" }, size(n.bytes_out)),
    el("td", { class: "num" }, rate(n.rate_in)), el("td", { class: "num" }, rate(n.rate_out)),
    el("td", { class: "num" }, n.dht_contacts))), "no serve or mount process is running", 9);
  replaceRows($("peers-body"), snap.peers.map((p) => keyed(`${p.via_pid} ${p.drive} ${p.node_id}`,
                                                           [p, ago(p.last_seen, now)],
    el("td", { class: "id", title: p.node_id }, short(p.node_id)), el("td", {}, p.addr || "—"),
    el("td", { class: "id", title: p.drive }, short(p.drive)),
    el("td", {}, p.connected ? "yes" : "no"), el("td", {}, ago(p.last_seen, now)),
    el("td", { class: "num" }, size(p.bytes_in)), el("td", { class: "num" }, rate(p.rate_in)))),
    "no peers yet", 7);
}

// -- cache ------------------------------------------------------------------------------
const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function renderCache(snap) {
  const c = snap.cache;
  const limit = c.limit_bytes;
  const meter = $("cache-meter");
  meter.max = limit || Math.max(c.used_bytes, 1);
  meter.value = c.used_bytes;
  meter.setAttribute("aria-label", "cache use");
  $("cache-text").textContent = `${size(c.used_bytes)} used of ${limit ? size(limit) : "no limit"}`;
  const items = [["used", size(c.used_bytes)], ["limit", limit ? size(limit) : "none"],
    ["pinned", size(c.pinned_bytes)], ["evictable", size(c.evictable_bytes)], ["blocks", c.blocks]];
  $("cache-list").replaceChildren(...items.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  const W = 900, H = 180, L = 70, B = 20;
  const pts = c.history;
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img",
                             "aria-label": `cache use over time, now ${size(c.used_bytes)}` });
  const top = Math.max(limit || 0, ...pts.map((p) => p[1]), 1) * 1.05;
  const t0 = pts.length ? pts[0][0] : 0, t1 = pts.length ? pts[pts.length - 1][0] : 1;
  const x = (t) => L + (W - L - 10) * (t1 > t0 ? (t - t0) / (t1 - t0) : 1);
  const y = (v) => H - B - (H - B - 10) * (v / top);
  chart.append(svg("line", { class: "axis", x1: L, y1: H - B, x2: W - 10, y2: H - B }),
               svg("line", { class: "axis", x1: L, y1: 10, x2: L, y2: H - B }));
  for (const v of [0, top / 2, top / 1.05]) {
    const t = svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" });
    t.textContent = size(Math.round(v));
    chart.append(t);
  }
  if (limit) chart.append(svg("line", { class: "limit", x1: L, y1: y(limit), x2: W - 10, y2: y(limit) }));
  if (pts.length) {
    const line = pts.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
    chart.append(svg("polygon", { class: "area",
      points: `${x(t0).toFixed(1)},${H - B} ${line} ${x(t1).toFixed(1)},${H - B}` }),
      svg("polyline", { class: "use", points: line }));
    const span = svg("text", { x: W - 10, y: H - 4, "text-anchor": "end" });
    const secs = Math.round(t1 - t0);
    span.textContent = secs < 120 ? `last ${secs} s` : `last ${Math.round(secs / 60)} min`;
    chart.append(span);
  }
  $("cache-chart").replaceChildren(chart);
}

// -- files -----------------------------------------------------------------------------
function renderMounts(snap) {
  const sel = $("mount-select");
  const have = [...sel.options].map((o) => o.value).join("\n");
  const want = snap.mounts.map((m) => m.mountpoint);
  if (have !== want.join("\n")) {
    sel.replaceChildren(...(want.length ? want.map((mp) => el("option", { value: mp }, mp))
                                        : [el("option", { value: "" }, "no mounts")]));
  }
  const inside = currentPath && want.some((mp) => currentPath === mp || currentPath.startsWith(mp + "/"));
  if (!inside && (want[0] || null) !== currentPath) navigate(want[0] || null);
  else if (sel.value !== mountOf(currentPath, want)) sel.value = mountOf(currentPath, want);
}
const mountOf = (p, mps) => mps.find((mp) => p === mp || p.startsWith(mp + "/")) || "";

async function act(kind, path) {
  busy[path] = kind;
  $("tree-error").hidden = true;
  try {
    const res = await fetch(q(`/api/${kind}`), { method: "POST",
      headers: { "Content-Type": "application/json", "X-Peerdrive-Token": TOKEN },
      body: JSON.stringify({ path }) });
    const data = await res.json().catch(() => ({}));
    if (!res.ok) throw new Error(data.error || `${kind} failed (${res.status})`);
  } catch (err) {
    $("tree-error").textContent = `${kind} ${path}: ${err.message}`;
    $("tree-error").hidden = false;
  } finally {
    delete busy[path];
  }
}

function renderTree(tree) {
  if (tree.path !== currentPath) return;
  if (tree.error) {
    $("tree-error").textContent = tree.error;
    $("tree-error").hidden = false;
    return;
  }
  const crumbs = [];
  const mp = tree.mountpoint;
  const rel = tree.path.slice(mp.length).split("/").filter(Boolean);
  crumbs.push(el("button", { class: "link", onclick: () => navigate(mp) }, mp));
  rel.forEach((part, i) => {
    const p = mp + "/" + rel.slice(0, i + 1).join("/");
    crumbs.push(" / ", el("button", { class: "link", onclick: () => navigate(p) }, part));
  });
  const f = tree.folder;
  const summary = f.complete === false
    ? ` — counting (${f.counted_files ?? 0} of ${f.files ?? "?"} files), ${size(f.size_bytes)}`
    : ` — ${f.state}, ${size(f.cached_bytes)} of ${size(f.size_bytes)} on this device`;
  const bc = $("breadcrumb");
  if (bc.dataset.path !== tree.path) {  // rebuilt only on navigation: focus stays put
    bc.replaceChildren(...crumbs, el("span", { class: "summary" }));
    bc.dataset.path = tree.path;
  }
  bc.querySelector(".summary").textContent = summary;
  const rows = [];
  if (tree.parent) {
    rows.push(keyed("parent", tree.parent, el("td", { colspan: 7 },
      el("button", { class: "link", onclick: () => navigate(tree.parent) }, "⬑ parent folder"))));
  }
  for (const e of tree.entries) {
    const name = e.kind === "dir"
      ? el("button", { class: "link", onclick: () => navigate(e.path) }, `${e.name}/`)
      : el("span", {}, e.kind === "link" ? `${e.name} → ${e.target}` : e.name);
    const actions = el("td", {});
    if (e.kind === "dir" || e.kind === "file") {
      const b = (kind, label, disabled) => el("button", { type: "button", "data-action": kind,
        "aria-label": `${label} ${e.name}`, disabled: disabled || busy[e.path] ? "" : false,
        onclick: () => act(kind, e.path) }, label);
      actions.append(b("pin", "Pin", e.pinned), b("unpin", "Unpin", !e.pinned),
                     b("evict", "Evict", e.state === "cloud"));
    }
    rows.push(el("tr", { "data-path": e.path, "data-kind": e.kind, "data-key": e.path,
                         "data-sig": JSON.stringify([e, copies[e.path], busy[e.path]]) },
      el("td", {}, name),
      e.kind === "link" || e.error ? el("td", {}, e.error || "link") : stateCell(e),
      el("td", { class: "num" }, size(e.cached_bytes)), el("td", { class: "num" }, size(e.size_bytes)),
      el("td", {}, e.pinned === undefined ? "—" : (e.pinned ? "yes" : "no")),
      el("td", { class: "num" }, copies[e.path] ?? "…"), actions));
  }
  replaceRows($("tree-body"), rows, "empty folder", 7);
  $("tree-more").textContent = tree.more ? `and ${tree.more} more entries not shown` : "";
}

async function loadCopies(path) {
  try {
    const res = await fetch(q(`/api/tree?copies=1&path=${encodeURIComponent(path)}`));
    const tree = await res.json();
    if (!res.ok || tree.path !== currentPath) return;
    for (const e of tree.entries) if (e.copies !== undefined) copies[e.path] = e.copies;
    renderTree(tree);
  } catch (err) { /* copies stay "…" */ }
}

function navigate(path) {
  currentPath = path;
  copies = {};
  $("tree-error").hidden = true;
  if (!path) {
    $("tree-body").replaceChildren();
    $("breadcrumb").textContent = "";
    delete $("breadcrumb").dataset.path;
  }
  connect();
  if (path) loadCopies(path);
}

// -- the live stream -------------------------------------------------------------------
function connect() {
  if (source) source.close();
  const url = currentPath ? `/api/events?path=${encodeURIComponent(currentPath)}` : "/api/events";
  source = new EventSource(q(url));
  source.addEventListener("dashboard", (ev) => {
    const snap = JSON.parse(ev.data);
    $("live").textContent = `live · ${new Date(snap.time * 1000).toLocaleTimeString()} · ${snap.home}`;
    renderDrives(snap); renderNodes(snap); renderCache(snap); renderMounts(snap);
  });
  source.addEventListener("tree", (ev) => renderTree(JSON.parse(ev.data)));
  source.onerror = () => { $("live").textContent = "disconnected; retrying…"; };
}

$("mount-select").addEventListener("change", (ev) => navigate(ev.target.value || null));
connect();
