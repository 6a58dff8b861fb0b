// Understudy status dashboard. No library, no inline code (the page's CSP forbids it).
// The page holds no data: every number comes from /admin/* with the admin key, which is kept in
// sessionStorage and sent as a Bearer header (no cookies). Text from the server is only ever
// inserted with textContent, never parsed as HTML.
(function () {
  "use strict";

  var KEY_STORE = "understudy.adminKey";
  var POLL_MS = 2000;
  var FETCH_TIMEOUT_MS = 8000;
  var HOUR_S = 3600;
  var BUCKET_S = 60;
  var ROUTE_FULL_LIMIT = 5000;
  var ROUTE_TAIL_LIMIT = 200;
  var HARDWARE_EVERY = 15; // polls (30 s): the hardware and plan change only with a restart
  var SVG_NS = "http://www.w3.org/2000/svg";
  var ROUTES = ["cloud", "local", "none"];

  var state = {
    timer: null,
    polling: false,
    inflight: false,
    tick: 0,
    skewS: 0,             // server clock minus browser clock (from the Date header), seconds
    routeRows: new Map(), // id -> route row, last hour
    routeTruncated: false,
    prevEngine: {},       // model id -> {t, completion, tokens, texts}
    rates: {}             // model id -> last computed rate
  };

  // -- small helpers ---------------------------------------------------------------------------
  function $(id) { return document.getElementById(id); }

  function el(tag, opts, children) {
    var node = document.createElement(tag);
    opts = opts || {};
    if (opts.id) node.id = opts.id;
    if (opts.cls) node.className = opts.cls;
    if (opts.text !== undefined && opts.text !== null) node.textContent = String(opts.text);
    if (opts.attrs) Object.keys(opts.attrs).forEach(function (k) { node.setAttribute(k, opts.attrs[k]); });
    (children || []).forEach(function (c) { if (c) node.appendChild(c); });
    return node;
  }

  function svg(tag, attrs, text) {
    var node = document.createElementNS(SVG_NS, tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, String(attrs[k])); });
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

  // Ids are built from server names: keep them to characters that are safe in a CSS selector.
  function safeId(name) { return String(name).replace(/[^A-Za-z0-9_.-]/g, "_"); }

  function fmt(n, digits) {
    if (n === null || n === undefined || isNaN(n)) return "–";
    return Number(n).toFixed(digits === undefined ? 0 : digits);
  }

  function fmtBytes(b) {
    if (b === null || b === undefined) return "–";
    var gib = b / Math.pow(1024, 3);
    return gib >= 1 ? gib.toFixed(1) + " GiB" : (b / Math.pow(1024, 2)).toFixed(0) + " MiB";
  }

  function fmtTime(ts) {
    var d = new Date((ts - state.skewS) * 1000);
    function p(n) { return (n < 10 ? "0" : "") + n; }
    return p(d.getHours()) + ":" + p(d.getMinutes()) + ":" + p(d.getSeconds());
  }

  function serverNow() { return Date.now() / 1000 + state.skewS; }

  // -- key and fetching ------------------------------------------------------------------------
  function getKey() {
    try { return window.sessionStorage.getItem(KEY_STORE); } catch (e) { return null; }
  }

  function setKey(k) {
    try {
      if (k === null) window.sessionStorage.removeItem(KEY_STORE);
      else window.sessionStorage.setItem(KEY_STORE, k);
    } catch (e) { /* storage disabled: the key lives as long as the page */ }
    memoryKey = k;
  }
  var memoryKey = null;

  function currentKey() {
    var k = getKey();
    return k !== null ? k : memoryKey;
  }

  function AuthError(status, message) { this.status = status; this.message = message; }

  function api(path) {
    var headers = { "Accept": "application/json" };
    var key = currentKey();
    if (key) headers["Authorization"] = "Bearer " + key;
    var ctrl = new AbortController();
    var timer = setTimeout(function () { ctrl.abort(); }, FETCH_TIMEOUT_MS);
    return fetch(path, { headers: headers, credentials: "omit", cache: "no-store", signal: ctrl.signal })
      .then(function (r) {
        clearTimeout(timer);
        var date = r.headers.get("Date");
        if (date) {
          var skew = Date.parse(date) / 1000 - Date.now() / 1000;
          // The header has 1 s resolution: only correct a real skew between the two clocks.
          state.skewS = Math.abs(skew) > 5 ? skew : 0;
        }
        if (r.status === 401 || r.status === 403) {
          return r.json().catch(function () { return {}; }).then(function (body) {
            var msg = body && body.error && body.error.message ? body.error.message : "HTTP " + r.status;
            throw new AuthError(r.status, msg);
          });
        }
        if (!r.ok) {
          return r.text().then(function (t) { throw new Error(path + ": HTTP " + r.status + " " + t.slice(0, 200)); });
        }
        return r.json();
      }, function (err) {
        clearTimeout(timer);
        throw new Error(err && err.name === "AbortError" ? "the server did not answer in time" : "the server is unreachable");
      });
  }

  function showAuth(message) {
    stopPolling();
    $("dash").hidden = true;
    state.tick = 0;
    $("auth").hidden = false;
    $("change-key").hidden = true;
    var e = $("auth-error");
    e.hidden = !message;
    e.textContent = message || "";
    setConn("auth", "key needed");
    var input = $("key-input");
    input.value = "";
    input.focus();
  }

  function setConn(kind, text) {
    var c = $("conn");
    c.setAttribute("data-state", kind);
    c.textContent = text;
  }

  // -- polling ---------------------------------------------------------------------------------
  function startPolling() {
    $("auth").hidden = true;
    $("dash").hidden = false;
    $("change-key").hidden = false;
    state.polling = true;
    schedule(0);
  }

  function stopPolling() {
    state.polling = false;
    if (state.timer !== null) clearTimeout(state.timer);
    state.timer = null;
  }

  function schedule(ms) {
    if (state.timer !== null) clearTimeout(state.timer);
    state.timer = setTimeout(poll, ms);
  }

  function poll() {
    state.timer = null;
    if (!state.polling) return;
    if (document.hidden || state.inflight) return; // resumed by visibilitychange / by the poll in flight
    state.inflight = true;
    var first = state.tick === 0;
    var routePath = "/admin/events?kind=route&limit=" +
      (state.routeRows.size === 0 ? ROUTE_FULL_LIMIT : ROUTE_TAIL_LIMIT);
    var jobs = [
      api("/admin/status"),
      api("/admin/events?limit=20"),
      api(routePath),
      api("/admin/readiness"),
      (first || state.tick % HARDWARE_EVERY === 0) ? api("/admin/hardware") : Promise.resolve(null)
    ];
    state.tick += 1;
    Promise.all(jobs).then(function (res) {
      return mergeRoutes(res[2], routePath).then(function () {
        renderStatus(res[0]);
        renderEvents(res[1].data || []);
        renderRoutes();
        renderReadiness(res[3].workloads || {});
        if (res[4]) renderHardware(res[4]);
        $("error").hidden = true;
        setConn("ok", "live");
        $("updated").textContent = "updated " + fmtTime(serverNow());
      });
    }).catch(function (err) {
      if (err instanceof AuthError) {
        setKey(null);
        showAuth(err.status === 403
          ? "This key may not read the dashboard (403: an admin key is needed). " + err.message
          : "The server refused the key (401). " + err.message);
        return;
      }
      var e = $("error");
      e.hidden = false;
      e.textContent = "Cannot refresh: " + (err && err.message ? err.message : String(err));
      setConn("down", "disconnected");
    }).then(function () {
      state.inflight = false;
      if (state.polling) schedule(POLL_MS);
    });
  }

  // Keep the last hour of route rows by id. Each poll asks for the newest 200 only; when none of
  // them is already known (more than 200 new requests since the last poll), refetch the full 5000.
  function mergeRoutes(body, path) {
    var rows = (body && body.data) || [];
    var full = path.indexOf("limit=" + ROUTE_FULL_LIMIT) !== -1;
    var known = rows.some(function (r) { return state.routeRows.has(r.id); });
    if (!full && rows.length >= ROUTE_TAIL_LIMIT && !known) {
      state.routeRows.clear();
      return api("/admin/events?kind=route&limit=" + ROUTE_FULL_LIMIT).then(function (b) {
        return mergeRoutes(b, "limit=" + ROUTE_FULL_LIMIT);
      });
    }
    var cutoff = serverNow() - HOUR_S;
    rows.forEach(function (r) { if (r.ts >= cutoff) state.routeRows.set(r.id, r); });
    state.routeRows.forEach(function (r, id) { if (r.ts < cutoff) state.routeRows.delete(id); });
    if (full) {
      state.routeTruncated = rows.length >= ROUTE_FULL_LIMIT && rows[rows.length - 1].ts >= cutoff;
    }
    return Promise.resolve();
  }

  // -- rendering -------------------------------------------------------------------------------
  var BREAKER_TEXT = { closed: "closed: cloud in use", open: "open: cloud skipped", half_open: "half-open: trial",
                       slow: "slow: local first" };

  function renderStatus(st) {
    var ups = st.upstreams || {};
    var box = $("upstreams");
    var names = Object.keys(ups).sort();
    $("upstreams-empty").hidden = names.length > 0;
    var seen = {};
    names.forEach(function (name) {
      var u = ups[name];
      var id = "breaker-" + safeId(name);
      seen[id] = true;
      var card = $(id);
      if (!card) {
        card = el("div", { id: id, cls: "card breaker" }, [
          el("div", { cls: "card-head" }, [el("span", { cls: "dot" }), el("span", { cls: "name", text: name })]),
          el("div", { cls: "breaker-state" }),
          el("div", { cls: "breaker-detail small" })
        ]);
        box.appendChild(card);
      }
      var s = String(u.breaker);
      card.setAttribute("data-state", s);
      card.className = "card breaker state-" + safeId(s);
      card.querySelector(".breaker-state").textContent = BREAKER_TEXT[s] || s;
      var detail = [];
      if (u.retry_after_s > 0) detail.push("retry in " + fmt(u.retry_after_s, 1) + " s");
      if (u.last_failure) detail.push("last failure: " + u.last_failure);
      card.querySelector(".breaker-detail").textContent = detail.join(" · ") || "no failure recorded";
    });
    Array.prototype.slice.call(box.children).forEach(function (c) { if (!seen[c.id]) box.removeChild(c); });

    var fo = st.failover || {};
    var info = [];
    var dl = fo.first_token_deadline_s || {};
    Object.keys(dl).sort().forEach(function (w) {
      var d = dl[w] || {};
      info.push(w + ": first-token deadline " + fmt(d.stream, 1) + " s stream / " + fmt(d.json, 1) + " s json");
    });
    if (names.length && fo.covered_cloud_attempts !== undefined) {
      info.push("hedged " + fo.hedged + " of " + fo.covered_cloud_attempts + " covered cloud attempts (" +
                fo.hedges_won_by_local + " won by local)");
    }
    if (st.uptime_s !== undefined) info.push("uptime " + fmtDuration(st.uptime_s));
    $("failover-info").textContent = info.join(" · ");

    renderModels(st.models || {});
  }

  function fmtDuration(s) {
    s = Math.floor(s);
    if (s < 120) return s + " s";
    if (s < 7200) return Math.floor(s / 60) + " min";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  }

  function modelRow(id, m) {
    var eng = m.engine;
    var now = performance.now() / 1000;
    var prev = state.prevEngine[id];
    var cells = { waiting: "–", running: "–", rate: "–", requests: "–" };
    if (eng) {
      var counter, unit;
      if (eng.completion_tokens !== undefined) {          // LLM engine
        cells.waiting = fmt(eng.waiting);
        cells.running = fmt(eng.running) + " / " + fmt(eng.slots);
        counter = eng.completion_tokens; unit = " tok/s out";
      } else if (eng.queued_inputs !== undefined) {       // embedding engine
        cells.waiting = fmt(eng.queued_inputs) + " inputs";
        cells.running = "–";
        cells.note = "largest batch so far: " + fmt(eng.max_batch) + " inputs";
        counter = eng.tokens; unit = " tok/s in";
      } else if (eng.texts !== undefined) {               // classifier head (shares the embedding engine)
        cells.waiting = "(shared)";
        counter = eng.texts; unit = " texts/s";
      }
      cells.requests = fmt(eng.requests);
      if (counter !== undefined) {
        if (prev && prev.counter !== undefined && now > prev.t && counter >= prev.counter) {
          state.rates[id] = (counter - prev.counter) / (now - prev.t);
        }
        state.prevEngine[id] = { t: now, counter: counter };
        cells.rate = state.rates[id] === undefined ? "…" + unit : fmt(state.rates[id], 1) + unit;
      }
    }
    return cells;
  }

  function renderModels(models) {
    var body = $("models-body");
    clear(body);
    Object.keys(models).forEach(function (id) {
      var m = models[id];
      var c = modelRow(id, m);
      var stateCell = el("td", { cls: "model-state state-" + safeId(m.state), text: m.state });
      if (m.reason) stateCell.setAttribute("title", m.reason);
      var tr = el("tr", { id: "model-" + safeId(id), attrs: { "data-model": id, "data-state": m.state } }, [
        el("td", { cls: "mono", text: id }),
        el("td", { text: m.kind }),
        stateCell,
        el("td", { cls: "num", text: c.waiting }),
        el("td", { cls: "num", text: c.running, attrs: c.note ? { title: c.note } : {} }),
        el("td", { cls: "num", text: c.rate }),
        el("td", { cls: "num", text: c.requests })
      ]);
      body.appendChild(tr);
      if (m.reason && m.state !== "ready") {
        body.appendChild(el("tr", { cls: "reason-row" }, [el("td", { attrs: { colspan: "7" }, cls: "small", text: m.reason })]));
      }
    });
  }

  function isFailover(r) { return r.route === "local" && r.reason !== null && r.reason !== undefined && !!r.upstream; }

  function renderRoutes() {
    var now = serverNow();
    var counts = { cloud: 0, local: 0, none: 0 };
    var failovers = 0, reasons = {};
    var buckets = [];
    for (var i = 0; i < HOUR_S / BUCKET_S; i++) buckets.push({ cloud: 0, local: 0, none: 0, failover: 0 });
    state.routeRows.forEach(function (r) {
      var route = ROUTES.indexOf(r.route) === -1 ? "none" : r.route;
      counts[route] += 1;
      var fo = isFailover(r);
      if (fo) { failovers += 1; reasons[r.reason] = (reasons[r.reason] || 0) + 1; }
      var idx = buckets.length - 1 - Math.floor((now - r.ts) / BUCKET_S);
      if (idx >= 0 && idx < buckets.length) {
        buckets[idx][route] += 1;
        if (fo) buckets[idx].failover += 1;
      }
    });
    $("mix-cloud").textContent = counts.cloud;
    $("mix-local").textContent = counts.local;
    $("mix-none").textContent = counts.none;
    $("failovers").textContent = failovers;

    var total = counts.cloud + counts.local + counts.none;
    var bar = $("mix-bar");
    clear(bar);
    bar.appendChild(mixSvg(counts, total));

    var list = $("failover-reasons");
    clear(list);
    Object.keys(reasons).sort(function (a, b) { return reasons[b] - reasons[a]; }).forEach(function (k) {
      list.appendChild(el("li", { attrs: { "data-reason": k } }, [
        el("span", { cls: "reason mono", text: k }), el("span", { cls: "count", text: " × " + reasons[k] })
      ]));
    });
    var note = $("mix-note");
    note.hidden = !state.routeTruncated;
    note.textContent = state.routeTruncated ? "More than " + ROUTE_FULL_LIMIT +
      " requests in the hour before this page opened: counts start from the newest " + ROUTE_FULL_LIMIT + "." : "";
    drawPlot(buckets);
  }

  function mixSvg(counts, total) {
    var s = svg("svg", { viewBox: "0 0 100 6", preserveAspectRatio: "none", "class": "mix", role: "img" });
    s.appendChild(svg("title", {}, "cloud " + counts.cloud + ", local " + counts.local + ", none " + counts.none));
    if (total === 0) {
      s.appendChild(svg("rect", { x: 0, y: 0, width: 100, height: 6, "class": "empty" }));
      return s;
    }
    var x = 0;
    ROUTES.forEach(function (r) {
      var w = 100 * counts[r] / total;
      if (w > 0) s.appendChild(svg("rect", { x: x, y: 0, width: w, height: 6, "class": "route-" + r }));
      x += w;
    });
    return s;
  }

  function niceMax(v) {
    if (v <= 5) return 5;
    var p = Math.pow(10, Math.floor(Math.log10(v)));
    var steps = [1, 2, 2.5, 5, 10];
    for (var i = 0; i < steps.length; i++) if (steps[i] * p >= v) return steps[i] * p;
    return 10 * p;
  }

  function drawPlot(buckets) {
    var W = 720, H = 180, L = 40, R = 8, T = 10, B = 24;
    var pw = W - L - R, ph = H - T - B;
    var max = 0;
    buckets.forEach(function (b) { max = Math.max(max, b.cloud + b.local + b.none); });
    var ymax = niceMax(max);
    var s = svg("svg", { id: "route-plot-svg", viewBox: "0 0 " + W + " " + H, "class": "plot-svg", role: "img",
                         "aria-label": "requests per minute by route, last hour" });
    s.appendChild(svg("title", {}, "Requests per minute by route, last hour"));
    var grid = svg("g", { "class": "grid" });
    [0, 0.5, 1].forEach(function (f) {
      var y = T + ph - f * ph;
      grid.appendChild(svg("line", { x1: L, x2: L + pw, y1: y, y2: y }));
      grid.appendChild(svg("text", { x: L - 6, y: y + 4, "text-anchor": "end" }, fmt(ymax * f, ymax * f % 1 ? 1 : 0)));
    });
    [[0, "−60 min"], [0.5, "−30 min"], [1, "now"]].forEach(function (p) {
      grid.appendChild(svg("text", { x: L + p[0] * pw, y: H - 6, "text-anchor": p[0] === 0 ? "start" : p[0] === 1 ? "end" : "middle" }, p[1]));
    });
    s.appendChild(grid);
    var bw = pw / buckets.length;
    var bars = svg("g", { "class": "bars" });
    buckets.forEach(function (b, i) {
      var total = b.cloud + b.local + b.none;
      if (total === 0) return;
      var g = svg("g", { "class": "bucket", "data-minute": i - buckets.length + 1 });
      var y = T + ph;
      ROUTES.forEach(function (r) {
        if (!b[r]) return;
        var h = ph * b[r] / ymax;
        y -= h;
        g.appendChild(svg("rect", { x: L + i * bw + 0.5, y: y, width: Math.max(bw - 1, 1), height: h, "class": "route-" + r }));
      });
      var ago = buckets.length - 1 - i;
      g.appendChild(svg("title", {}, (ago === 0 ? "this minute" : ago + " min ago") + ": cloud " + b.cloud + ", local " +
        b.local + " (" + b.failover + " failovers), none " + b.none));
      bars.appendChild(g);
    });
    s.appendChild(bars);
    s.appendChild(svg("line", { x1: L, x2: L + pw, y1: T + ph, y2: T + ph, "class": "axis" }));
    var box = $("route-plot");
    clear(box);
    box.appendChild(s);
  }

  function renderReadiness(workloads) {
    var body = $("readiness-body");
    clear(body);
    var names = Object.keys(workloads).sort();
    $("readiness-empty").hidden = names.length > 0;
    $("readiness").hidden = names.length === 0;
    names.forEach(function (name) {
      var w = workloads[name];
      var counts = w.counts || {};
      var outcomes = Object.keys(counts).sort().map(function (k) { return k + " " + counts[k]; }).join(", ");
      var level = w.readiness === null || w.readiness === undefined ? "unknown"
        : w.readiness >= 0.9 ? "good" : w.readiness >= 0.75 ? "fair" : "poor";
      var value = w.readiness === null || w.readiness === undefined ? "no samples yet"
        : (100 * w.readiness).toFixed(1) + " %";
      var readinessCell = el("td", { cls: "readiness-value level-" + level, text: value });
      if (w.metric) readinessCell.setAttribute("title", w.metric);
      var extra = w.supported !== undefined && w.supported !== null ? "; supported " + (100 * w.supported).toFixed(0) + " %" : "";
      body.appendChild(el("tr", { id: "readiness-" + safeId(name), attrs: { "data-level": level } }, [
        el("td", { cls: "mono", text: name }),
        readinessCell,
        el("td", { cls: "num", text: fmt(w.samples) }),
        el("td", { cls: "num", text: fmt(100 * (w.shadow_rate || 0), 0) + " %" }),
        el("td", { cls: "small", text: (outcomes || "–") + extra })
      ]));
    });
  }

  function renderHardware(hw) {
    var h = hw.hardware || {};
    var dl = $("hardware");
    clear(dl);
    function row(k, v) { dl.appendChild(el("dt", { text: k })); dl.appendChild(el("dd", { text: v })); }
    var cpu = h.cpu || {};
    row("CPU", (cpu.model || "?") + " (" + (cpu.arch || "?") + "), " + fmt(cpu.physical_cores) + " physical / " +
      fmt(cpu.logical_cores) + " logical cores; " + fmt(h.usable_cores) + " usable");
    var mem = h.memory || {};
    row("Memory", fmtBytes(mem.total_bytes) + " total, " + fmtBytes(h.usable_memory_bytes) + " usable");
    var gpu = h.gpu || {};
    var gpus = (gpu.gpus || []).map(function (g) {
      return (g.name || "GPU") + (g.memory_total_bytes ? " " + fmtBytes(g.memory_total_bytes) : "");
    });
    row("GPU", gpus.length ? gpus.join(", ") : "none" + (gpu.reason ? " (" + gpu.reason + ")" : ""));
    var plan = hw.plan || {};
    $("plan-summary").textContent = plan.summary || "no plan";
    var pm = $("plan-models");
    clear(pm);
    Object.keys(plan.models || {}).forEach(function (id) {
      var p = plan.models[id];
      var text = id + ": " + (p.refused ? "refused: " + p.refused : (p.device || "?") + ", " + fmt(p.host_mib) + " MiB RAM" +
        (p.gpu_mib ? ", " + fmt(p.gpu_mib) + " MiB GPU" : ""));
      pm.appendChild(el("li", { id: "plan-" + safeId(id), cls: p.refused ? "refused" : "", text: text }));
    });
    var warn = $("hw-warnings");
    clear(warn);
    var warnings = (hw.warnings || []).concat(plan.warnings || []);
    warnings.filter(function (w, i) { return warnings.indexOf(w) === i; }).forEach(function (w) {
      warn.appendChild(el("li", { text: typeof w === "string" ? w : JSON.stringify(w) }));
    });
  }

  function eventSummary(e) {
    var parts = [];
    function add(v, prefix) { if (v !== null && v !== undefined && v !== "") parts.push((prefix || "") + v); }
    switch (e.kind) {
      case "route":
        add(e.endpoint); add(e.workload, "workload ");
        add(e.route ? "→ " + e.route : null); add(e.model);
        add(e.reason, "because "); add(e.status, "HTTP ");
        if (e.latency_ms !== null && e.latency_ms !== undefined) parts.push(fmt(e.latency_ms, e.latency_ms < 10 ? 1 : 0) + " ms");
        break;
      case "breaker":
        add(e.upstream); add(e.reason); add(e.detail, "— ");
        break;
      case "drill":
        add(e.request_id); add(e.reason, "verdict "); add(e.detail, "— ");
        break;
      case "shadow":
        add(e.workload); add(e.model); add(e.reason); add(e.detail, "— ");
        break;
      default:
        add(e.reason); add(e.detail, "— ");
    }
    return parts.join(" ");
  }

  function renderEvents(rows) {
    var list = $("events");
    clear(list);
    $("events-empty").hidden = rows.length > 0;
    rows.forEach(function (e) {
      var kind = safeId(e.kind || "event");
      var cls = "event kind-" + kind;
      if (e.kind === "route") cls += " route-" + safeId(e.route) + (isFailover(e) ? " is-failover" : "");
      if (e.kind === "breaker" && typeof e.reason === "string") cls += " to-" + safeId(e.reason.split("->").pop());
      list.appendChild(el("li", { cls: cls, attrs: { "data-id": e.id, "data-kind": e.kind } }, [
        el("time", { cls: "ts mono", text: fmtTime(e.ts) }),
        el("span", { cls: "badge", text: e.kind }),
        el("span", { cls: "summary", text: eventSummary(e) })
      ]));
    });
  }

  // -- wiring ----------------------------------------------------------------------------------
  function init() {
    $("key-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      setKey($("key-input").value.trim());
      $("key-input").value = "";
      state.routeRows.clear();
      startPolling();
    });
    $("change-key").addEventListener("click", function () {
      setKey(null);
      showAuth("");
    });
    document.addEventListener("visibilitychange", function () {
      if (!state.polling) return;
      if (document.hidden) {
        if (state.timer !== null) clearTimeout(state.timer);
        state.timer = null;
        setConn("paused", "paused (tab hidden)");
      } else {
        schedule(0);
      }
    });
    if (currentKey() === null) showAuth("");
    else startPolling();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
