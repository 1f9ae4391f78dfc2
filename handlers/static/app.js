// QAFlow dashboard: plain JS, no build step, no network beyond this daemon.
// The WebSocket speaks the DIFF shape: every rtn_data patch is merged into one tree.
"use strict";
(function () {
  const $ = (s, el) => (el || document).querySelector(s);
  const params = new URLSearchParams(location.search);
  const store = window.localStorage;
  const state = {
    tree: { quotes: {}, trade: {} },   // DIFF data tree (merged patches)
    updates: 0, messages: 0, bytes: 0,
    bars: {},                          // instrument -> [{t, o, h, l, c}] (1 min)
    ws: null, token: params.get("token") || store.getItem("qaflow.token") || "",
    ins: params.get("ins") || store.getItem("qaflow.ins") || "rb2605,au2606",
    accs: params.get("accounts") || store.getItem("qaflow.accounts") || "",
  };
  window.__qaflow = state;             // for tests and the browser console

  function merge(tree, patch) {        // DIFF: objects merge, values replace, null deletes
    for (const k in patch) {
      const v = patch[k];
      if (v === null) { delete tree[k]; }
      else if (typeof v === "object" && !Array.isArray(v)) {
        if (typeof tree[k] !== "object" || tree[k] === null) tree[k] = {};
        merge(tree[k], v);
      } else { tree[k] = v; }
    }
  }
  function hdrs() { return state.token ? { Authorization: "Bearer " + state.token } : {}; }
  async function api(path) {
    const r = await fetch(path, { headers: hdrs() });
    if (!r.ok) throw new Error(path + ": " + r.status);
    return r.json();
  }
  const fmt = (x, d) => (x === undefined || x === null || x === "") ? "" :
    (typeof x === "number" ? x.toLocaleString("en-US", { maximumFractionDigits: d === undefined ? 2 : d }) : String(x));
  function esc(s) { return String(s).replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c])); }

  // ---------------------------------------------------------------- WebSocket
  function connect() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(proto + "//" + location.host + "/ws" + (state.token ? "?token=" + encodeURIComponent(state.token) : ""));
    state.ws = ws;
    ws.onopen = () => { setConn(true); subscribe(); };
    ws.onclose = (ev) => {
      setConn(false, ev.reason);
      if (state.ws === ws) setTimeout(connect, 1500);
    };
    ws.onmessage = (ev) => {
      state.messages++; state.bytes += ev.data.length;
      const msg = JSON.parse(ev.data);
      if (msg.aid === "rtn_data") {
        const changed = new Set();
        for (const patch of msg.data) {
          merge(state.tree, patch);
          if (patch.quotes) for (const k in patch.quotes) changed.add(k);
          if (patch.trade) renderAccounts();
        }
        state.updates++;
        changed.forEach(k => { updateQuoteRow(k, (msg.data.find(p => p.quotes && p.quotes[k]) || {}).quotes[k]); liveBar(k); });
      } else if (msg.aid === "subscribe_quote_result") {
        status("quotes: " + msg.ins_list.join(", ") + (Object.keys(msg.ignored).length ? " — ignored: " + JSON.stringify(msg.ignored) : ""));
        ensureRows(msg.ins_list);
      } else if (msg.aid === "subscribe_account_result") {
        if (Object.keys(msg.ignored).length) status("accounts ignored: " + JSON.stringify(msg.ignored));
      } else if (msg.aid === "error") { status("server: " + msg.error); }
    };
  }
  async function subscribe() {
    const ws = state.ws;
    if (!ws || ws.readyState !== 1) return;
    ws.send(JSON.stringify({ aid: "subscribe_quote", ins_list: state.ins }));
    let accs = state.accs;
    if (!accs) {
      try { accs = (await api("/api/accounts")).accounts.map(a => a.account).join(","); } catch (e) { accs = ""; }
    }
    if (accs) ws.send(JSON.stringify({ aid: "subscribe_account", accounts: accs, token: state.token || undefined }));
    loadOrders(accs);
  }
  function setConn(on, reason) {
    const b = $("#conn"); b.className = "badge " + (on ? "on" : "off");
    b.textContent = on ? "live" : ("disconnected" + (reason ? ": " + reason : ""));
  }
  function status(s) { $("#status-line").textContent = s; }

  // ---------------------------------------------------------------- quotes
  const COLS = ["last_price", "chg", "bid_price1", "bid_volume1", "ask_price1", "ask_volume1", "volume", "open_interest", "highest", "lowest", "datetime"];
  function ensureRows(list) {
    const tb = $("#quotes tbody");
    for (const tr of Array.from(tb.children)) if (!list.includes(tr.dataset.ins)) tr.remove();
    for (const k of list) {
      if (tb.querySelector(`tr[data-ins="${k}"]`)) continue;
      const tr = document.createElement("tr"); tr.dataset.ins = k;
      tr.innerHTML = `<td>${esc(k)}</td>` + COLS.map(c => `<td class="${c}"></td>`).join("");
      tb.appendChild(tr);
      ensureChart(k);
      if (state.tree.quotes[k]) updateQuoteRow(k, state.tree.quotes[k]);
    }
  }
  function updateQuoteRow(k, changed) {
    ensureRows(Array.from(new Set([...Array.from($("#quotes tbody").children).map(t => t.dataset.ins), k])));
    const q = state.tree.quotes[k]; if (!q) return;
    const tr = $(`#quotes tbody tr[data-ins="${k}"]`);
    const ref = q.pre_settlement || q.pre_close;
    const chg = ref ? q.last_price - ref : 0;
    for (const c of COLS) {
      const td = tr.querySelector("td." + c);
      let v = c === "chg" ? (ref ? (chg >= 0 ? "+" : "") + fmt(chg) + " (" + fmt(100 * chg / ref, 2) + "%)" : "") :
        c === "datetime" ? String(q.datetime || "").slice(11, 23) : fmt(q[c]);
      if (td.textContent !== v) {
        td.textContent = v;
        if (changed && (c in changed || c === "chg")) { td.classList.remove("flash"); void td.offsetWidth; td.classList.add("flash"); }
      }
      if (c === "last_price" || c === "chg") td.className = c + (chg > 0 ? " up" : chg < 0 ? " down" : "");
    }
    $("#quote-stats").textContent = `${state.updates} updates, ${state.messages} messages, ${(state.bytes / 1024).toFixed(1)} KiB`;
  }

  // ---------------------------------------------------------------- bar charts (canvas)
  function ensureChart(k) {
    if (document.getElementById("chart-" + k)) return;
    const box = document.createElement("div"); box.className = "chart";
    box.innerHTML = `<div class="title">${esc(k)}</div><canvas id="chart-${esc(k)}" width="380" height="170"></canvas>`;
    $("#charts").appendChild(box);
    loadBars(k);
  }
  async function loadBars(k) {
    const [ex, sym] = k.split(".");
    try {
      const r = await api(`/api/bars?symbol=${encodeURIComponent(sym)}&exchange=${ex}&freq=1min&count=60`);
      const hist = r.bars.map(b => ({ t: b.datetime, o: b.open, h: b.high, l: b.low, c: b.close }));
      const live = (state.bars[k] || []).filter(b => !hist.length || b.t > hist[hist.length - 1].t);
      state.bars[k] = hist.concat(live).slice(-60);
      drawChart(k);
    } catch (e) { /* MongoDB down: live bars only */ }
  }
  function minuteOf(dt) {    // "2025-03-03 09:00:12.500" (exchange-local) -> epoch ms of the minute, as stored
    const m = /^(\d+)-(\d+)-(\d+) (\d+):(\d+)/.exec(dt || ""); if (!m) return null;
    return Date.UTC(+m[1], +m[2] - 1, +m[3], +m[4], +m[5]);
  }
  function liveBar(k) {
    const q = state.tree.quotes[k]; if (!q || !q.last_price) return;
    const t = minuteOf(q.datetime); if (t === null) return;
    const bars = state.bars[k] || (state.bars[k] = []);
    const last = bars[bars.length - 1], p = q.last_price;
    if (last && last.t === t) { last.h = Math.max(last.h, p); last.l = Math.min(last.l, p); last.c = p; }
    else if (!last || t > last.t) { bars.push({ t, o: p, h: p, l: p, c: p }); if (bars.length > 60) bars.shift(); }
    drawChart(k);
  }
  function drawChart(k) {
    const cv = document.getElementById("chart-" + k); if (!cv) return;
    const ctx = cv.getContext("2d"), W = cv.width, H = cv.height, pad = 6, axis = 54;
    ctx.clearRect(0, 0, W, H);
    const bars = state.bars[k] || [];
    ctx.fillStyle = "#7d8b99"; ctx.font = "11px system-ui";
    if (!bars.length) { ctx.fillText("waiting for data", 10, H / 2); return; }
    let lo = Infinity, hi = -Infinity;
    for (const b of bars) { lo = Math.min(lo, b.l); hi = Math.max(hi, b.h); }
    if (hi === lo) { hi += 1; lo -= 1; }
    const y = v => pad + (H - 2 * pad) * (hi - v) / (hi - lo);
    const n = 60, w = (W - axis - pad) / n;
    ctx.strokeStyle = "#26313d"; ctx.beginPath();
    for (let i = 0; i <= 4; i++) { const yy = pad + i * (H - 2 * pad) / 4; ctx.moveTo(0, yy); ctx.lineTo(W - axis, yy); }
    ctx.stroke();
    for (let i = 0; i <= 4; i++) ctx.fillText(fmt(hi - i * (hi - lo) / 4, 1), W - axis + 4, pad + i * (H - 2 * pad) / 4 + 4);
    bars.forEach((b, i) => {
      const x = (n - bars.length + i) * w + w / 2, up = b.c >= b.o;
      ctx.strokeStyle = ctx.fillStyle = up ? "#e5534b" : "#3fb950";
      ctx.beginPath(); ctx.moveTo(x, y(b.h)); ctx.lineTo(x, y(b.l)); ctx.stroke();
      const top = y(Math.max(b.o, b.c)), bh = Math.max(1, Math.abs(y(b.o) - y(b.c)));
      ctx.fillRect(x - Math.max(1, w * 0.35), top, Math.max(2, w * 0.7), bh);
    });
  }

  // ---------------------------------------------------------------- accounts and orders
  function renderAccounts() {
    const accs = state.tree.trade, box = $("#accounts"), names = Object.keys(accs).sort();
    if (!names.length) { box.innerHTML = '<p class="empty">no account</p>'; return; }
    box.innerHTML = names.map(a => {
      const t = accs[a] || {}, m = t.accounts || {};
      const pos = Object.entries(t.positions || {}).filter(([, p]) => (p.volume_long || 0) + (p.volume_short || 0) > 0);
      return `<div class="account" data-account="${esc(a)}"><b>${esc(a)}</b>
        <div class="kv"><span><b>balance</b>${fmt(m.balance)}</span><span><b>available</b>${fmt(m.available)}</span>
        <span><b>margin</b>${fmt(m.margin)}</span><span><b>float PnL</b>${fmt(m.float_profit)}</span>
        <span><b>position PnL</b>${fmt(m.position_profit)}</span><span><b>close PnL</b>${fmt(m.close_profit)}</span>
        <span><b>risk</b>${m.risk_ratio !== undefined ? fmt(100 * m.risk_ratio, 1) + "%" : ""}</span></div>
        <table><thead><tr><th>position</th><th>long</th><th>short</th><th>open long</th><th>open short</th><th>float PnL</th></tr></thead><tbody>
        ${pos.map(([k, p]) => `<tr><td>${esc(k)}</td><td>${fmt(p.volume_long)}</td><td>${fmt(p.volume_short)}</td>
          <td>${fmt(p.open_price_long)}</td><td>${fmt(p.open_price_short)}</td>
          <td class="${p.float_profit > 0 ? "up" : p.float_profit < 0 ? "down" : ""}">${fmt(p.float_profit)}</td></tr>`).join("") ||
          '<tr><td class="empty" colspan="6">no position</td></tr>'}
        </tbody></table></div>`;
    }).join("");
    renderOrders();
  }
  function renderOrders() {
    const rows = [];
    for (const [a, t] of Object.entries(state.tree.trade)) {
      for (const [id, o] of Object.entries((t && t.orders) || {})) rows.push([a, id, o]);
    }
    rows.sort((x, y) => (y[2].order_time || y[2].ts || 0) - (x[2].order_time || x[2].ts || 0));
    $("#orders tbody").innerHTML = rows.slice(0, 100).map(([a, id, o]) =>
      `<tr data-order-id="${esc(id)}"><td>${esc(id)}</td><td>${esc(o.account || a)}</td>
       <td>${esc((o.exchange || o.exchange_id || "") + "." + (o.symbol || o.instrument_id || ""))}</td>
       <td>${esc((o.direction || "") + " " + (o.offset || ""))}</td><td>${fmt(o.price !== undefined ? o.price : o.limit_price)}</td>
       <td>${fmt(o.volume !== undefined ? o.volume : o.volume_orign)}</td><td>${fmt(o.traded)}</td>
       <td class="status">${esc(o.status || "")}</td></tr>`).join("") || '<tr><td class="empty" colspan="8">no order</td></tr>';
  }
  async function loadOrders(accs) {
    for (const a of (accs || "").split(",").filter(Boolean)) {
      try {
        const r = await api("/api/orders?account=" + encodeURIComponent(a));
        const patch = {};
        for (const o of r.incoming) patch[o._id] = Object.assign({ status: o.state }, o.order || {});
        for (const o of r.orders) patch[o._id] = o;
        const mine = {}; for (const id in patch) if (!((state.tree.trade[a] || {}).orders || {})[id]) mine[id] = patch[id];
        merge(state.tree.trade, { [a]: { orders: mine } });
      } catch (e) { /* not readable */ }
    }
    renderAccounts();
  }

  // ---------------------------------------------------------------- follow rules and risk (polled)
  async function loadFollow() {
    try {
      const r = await api("/api/follow");
      $("#follow tbody").innerHTML = r.rules.map(x => `<tr><td>${esc(x._id)}</td><td>${esc(x.leader)}</td><td>${esc(x.follower)}</td>
        <td>${esc(x.sizing)} ${x.sizing === "FIXED" ? fmt(x.fixed_volume) : "x" + fmt(x.ratio)}</td>
        <td>${x.reverse ? "yes" : ""}</td><td>${x.enabled ? "yes" : "no"}</td></tr>`).join("") ||
        '<tr><td class="empty" colspan="6">no rule</td></tr>';
    } catch (e) { }
  }
  async function loadRisk() {
    try {
      const r = await api("/api/risk");
      $("#risk-state tbody").innerHTML = r.account_state.map(s => `<tr><td>${esc(s._id)}</td><td>${s.reduce_only ? "YES" : "no"}</td>
        <td>${esc(s.reason || "")}</td><td>${esc(s.operator || "")}</td>
        <td>${s.since_ns ? new Date(s.since_ns / 1e6).toLocaleString() : ""}</td></tr>`).join("") ||
        '<tr><td class="empty" colspan="5">no account blocked</td></tr>';
      const live = [];
      for (const [a, t] of Object.entries(state.tree.trade)) for (const e of Object.values((t && t.risk) || {})) live.push(Object.assign({ account: a }, e));
      const ev = live.concat(r.events).slice(0, 30);
      $("#risk-events").innerHTML = ev.map(e => `<li>${esc(e.account || "")}: ${esc(e.kind || e.action || e.rule || "")} ${esc(e.reason || e.detail || "")}</li>`).join("") ||
        '<li class="empty">none</li>';
    } catch (e) { }
  }

  // ---------------------------------------------------------------- forms
  function initForms() {
    $("#ins").value = state.ins; $("#accs").value = state.accs; $("#token").value = state.token;
    $("#settings").addEventListener("submit", ev => {
      ev.preventDefault();
      state.ins = $("#ins").value.trim(); state.accs = $("#accs").value.trim(); state.token = $("#token").value.trim();
      store.setItem("qaflow.ins", state.ins); store.setItem("qaflow.accounts", state.accs); store.setItem("qaflow.token", state.token);
      const old = state.ws; state.ws = null; if (old) old.close(); connect();
    });
    $("#order-form").addEventListener("submit", async ev => {
      ev.preventDefault();
      const f = new FormData(ev.target), body = {};
      for (const [k, v] of f.entries()) body[k] = v;
      body.price = Number(body.price); body.volume = parseInt(body.volume, 10); body.price_type = "LIMIT";
      const r = await fetch("/api/orders", { method: "POST", headers: Object.assign({ "Content-Type": "application/json" }, hdrs()), body: JSON.stringify(body) });
      const j = await r.json();
      $("#order-result").textContent = r.ok ? "sent " + j.order_id : "refused: " + j.error;
    });
  }

  initForms();
  ensureRows(state.ins.split(",").map(s => s.trim()).filter(s => s.includes(".")));
  connect();
  loadFollow(); loadRisk();
  setInterval(loadFollow, 10000); setInterval(loadRisk, 5000);
  setInterval(() => Object.keys(state.bars).forEach(k => loadBars(k)), 30000);
})();
