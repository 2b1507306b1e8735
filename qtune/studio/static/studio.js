// qtune studio: the page (docs/studio.md). Plain ES2020, no framework, no build step.
// Every element is built with createElement + textContent: nothing from data, logs or model output is parsed as HTML.
"use strict";

(function () {
  // ---------- small helpers ----------

  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
  const SVG = "http://www.w3.org/2000/svg";

  /** el("div", {class: "x", dataset: {name: "a"}}, "text", child, ...): an element; strings become text nodes. */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG, tag);
    setAttrs(node, attrs);
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function setAttrs(node, attrs) {
    if (!attrs) return;
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "dataset") Object.assign(node.dataset, v);
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
      else if (k === "style") throw new Error("no inline styles (CSP)");
      else node.setAttribute(k, v === true ? "" : String(v));
    }
  }

  /** Set text only when it changed (no flicker, no lost selection while polling). */
  function setText(node, text) {
    const t = text === null || text === undefined ? "" : String(text);
    if (node.textContent !== t) node.textContent = t;
  }

  function show(node, visible) {
    if (node.hidden === !visible) return;
    node.hidden = !visible;
  }

  function formatDuration(s) {
    if (s === null || s === undefined || !isFinite(s)) return "–";
    s = Math.max(0, Math.round(s));
    if (s < 60) return `${s} s`;
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    if (h > 0) return m ? `${h} h ${m} min` : `${h} h`;
    return sec ? `${m} min ${sec} s` : `${m} min`;
  }

  function formatBytes(n) {
    if (n === null || n === undefined) return "–";
    if (n < 1024) return `${n} B`;
    const units = ["KiB", "MiB", "GiB", "TiB"];
    let v = n / 1024, i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return `${v < 10 ? v.toFixed(2) : v < 100 ? v.toFixed(1) : v.toFixed(0)} ${units[i]}`;
  }

  /** A log as text: terminal control sequences (tqdm's cursor moves, colors) removed. */
  const stripAnsi = (text) => (text || "").replace(/\x1b\[[0-9;?]*[ -\/]*[@-~]/g, "").replace(/\x1b[()][A-Za-z0-9]/g, "");

  const gib = (n) => `${(n / 2 ** 30).toFixed(2)} GiB`;

  function formatNumber(v) {
    if (typeof v !== "number") return String(v);
    if (Number.isInteger(v)) return v.toLocaleString("en-US");
    const a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2);
    return v.toFixed(4).replace(/0+$/, "").replace(/\.$/, "");
  }

  function formatDate(s) {
    if (!s) return "–";
    const d = new Date(typeof s === "number" ? s * 1000 : s);
    if (isNaN(d.getTime())) return String(s);
    const pad = (x) => String(x).padStart(2, "0");
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}`;
  }

  // ---------- the API ----------

  const TOKEN_KEY = "qtune-studio-token";

  function readHash() {
    // "#runs", "#token=abc", "#plan&token=abc": the screen and the token (kept in sessionStorage, removed from the URL)
    const parts = location.hash.replace(/^#/, "").split("&").filter(Boolean);
    let screen = null, sawToken = false;
    for (const part of parts) {
      const eq = part.indexOf("=");
      if (eq < 0) { screen = screen || decodeURIComponent(part); continue; }
      if (part.slice(0, eq) === "token") {
        sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(part.slice(eq + 1)));
        sawToken = true;
      }
    }
    if (sawToken) history.replaceState(null, "", location.pathname + location.search + "#" + (screen || "runs"));
    return screen;
  }

  class ApiError extends Error {
    constructor(status, message, field) {
      super(message);
      this.status = status;
      this.field = field || null;
    }
  }

  function headers(json) {
    const h = {};
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) h["Authorization"] = `Bearer ${token}`;
    if (json) h["Content-Type"] = "application/json";
    return h;
  }

  async function errorFrom(response) {
    let message = `${response.status} ${response.statusText}`, field = null;
    try {
      const body = await response.json();
      if (body && body.error) {
        message = body.error.message || message;
        field = body.error.field || body.error.param || null;
      }
    } catch (_) { /* not JSON */ }
    if (response.status === 401 && !sessionStorage.getItem(TOKEN_KEY) && !message.includes("#token")) {
      message += " — open the page as http://HOST:PORT/#token=YOUR_TOKEN";
    }
    return new ApiError(response.status, message, field);
  }

  /** GET (body undefined) or POST/DELETE with a JSON body ({} when empty); resolves to the parsed JSON. */
  async function api(method, path, body) {
    const init = { method, headers: headers(method !== "GET"), cache: "no-store" };
    if (method !== "GET") init.body = JSON.stringify(body || {});
    let response;
    try {
      response = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, "the studio does not answer (is `qtune studio` still running?)");
    }
    if (!response.ok) throw await errorFrom(response);
    const text = await response.text();
    return text ? JSON.parse(text) : {};
  }

  const enc = encodeURIComponent;

  // ---------- errors: next to the field, or in the screen's banner ----------

  function clearErrors(screen) {
    for (const node of $$(".field-error", screen)) setText(node, "");
    for (const node of $$(".has-error", screen)) node.classList.remove("has-error");
    const banner = $(".banner-error", screen);
    setText(banner, "");
    show(banner, false);
  }

  function showError(screen, err) {
    const field = err && err.field;
    const message = (err && err.message) || String(err);
    if (field) {
      const slot = $$(".field-error", screen).find((n) => n.dataset.field === field && n.parentElement.getClientRects().length > 0);
      if (slot) {
        setText(slot, message);
        const input = slot.parentElement && slot.parentElement.querySelector("input, select, textarea");
        if (input) { input.classList.add("has-error"); input.focus(); }
        return;
      }
    }
    const banner = $(".banner-error", screen);
    setText(banner, message);
    show(banner, true);
  }

  function bannerOnly(screen, err) {
    const banner = $(".banner-error", screen);
    setText(banner, (err && err.message) || String(err));
    show(banner, true);
  }

  // ---------- the loss chart (an SVG built once per container, updated in place) ----------

  function niceTicks(lo, hi, count, minStep = 0) {
    if (!(hi > lo)) { hi = lo + 1; }
    const span = hi - lo;
    const step0 = span / Math.max(1, count);
    const mag = 10 ** Math.floor(Math.log10(step0));
    const norm = step0 / mag;
    const step = Math.max(minStep, (norm >= 5 ? 10 : norm >= 2 ? 5 : norm >= 1 ? 2 : 1) * mag);
    const ticks = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(+v.toFixed(12));
    return { ticks, step };
  }

  function tickLabel(v, step) {
    if (step >= 1) return String(Math.round(v));
    const digits = Math.min(6, Math.max(0, -Math.floor(Math.log10(step))));
    return v.toFixed(digits);
  }

  class LossChart {
    constructor(box, emptyText) {
      this.box = box;
      this.emptyText = emptyText;
      this.data = { loss: [], eval_loss: [] };
      this.key = null;
      this.svg = svg("svg", { class: "loss-chart", role: "img", "aria-label": "training and held-out loss" });
      this.grid = svg("g", { class: "grid" });
      this.axes = svg("g", { class: "axes" });
      this.train = svg("path", { class: "train-loss", fill: "none" });
      this.evalPath = svg("path", { class: "eval-loss", fill: "none" });
      this.evalDots = svg("g", { class: "eval-dots" });
      this.trainDots = svg("g", { class: "train-dots" });
      this.empty = svg("text", { class: "chart-empty", "text-anchor": "middle" });
      this.legend = el("div", { class: "chart-legend" },
        el("span", { class: "key key-train" }, "training loss"),
        el("span", { class: "key key-eval" }, "held-out loss"));
      this.svg.append(this.grid, this.axes, this.train, this.trainDots, this.empty);
      box.append(this.svg, this.legend);
      this.width = 0;
      new ResizeObserver(() => {
        const w = Math.round(this.box.clientWidth);
        if (w && w !== this.width) this.draw();
      }).observe(box);
    }

    update(loss, evalLoss) {
      loss = Array.isArray(loss) ? loss : [];
      evalLoss = Array.isArray(evalLoss) ? evalLoss : [];
      const key = `${loss.length}:${evalLoss.length}:${loss.length ? loss[loss.length - 1].join() : ""}:` +
        `${evalLoss.length ? evalLoss[evalLoss.length - 1].join() : ""}`;
      this.data = { loss, eval_loss: evalLoss };
      if (key === this.key && this.width === Math.round(this.box.clientWidth)) return;
      this.key = key;
      this.draw();
    }

    draw() {
      const W = Math.max(320, Math.round(this.box.clientWidth) || 640);
      const H = 240;
      this.width = Math.round(this.box.clientWidth);
      const m = { l: 48, r: 14, t: 12, b: 28 };
      this.svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
      this.svg.setAttribute("width", W);
      this.svg.setAttribute("height", H);
      const { loss, eval_loss: ev } = this.data;
      const all = loss.concat(ev).filter((p) => Array.isArray(p) && isFinite(p[0]) && isFinite(p[1]));
      this.grid.replaceChildren();
      this.axes.replaceChildren();
      this.legend.classList.toggle("no-eval", ev.length === 0);
      if (!all.length) {
        this.train.setAttribute("d", "");
        this.trainDots.replaceChildren();
        if (this.evalPath.isConnected) { this.evalPath.remove(); this.evalDots.remove(); }
        this.empty.setAttribute("x", W / 2);
        this.empty.setAttribute("y", H / 2);
        setText(this.empty, this.emptyText);
        this.legend.hidden = true;
        return;
      }
      this.legend.hidden = false;
      setText(this.empty, "");
      let x0 = Math.min(...all.map((p) => p[0])), x1 = Math.max(...all.map((p) => p[0]));
      let y0 = Math.min(...all.map((p) => p[1])), y1 = Math.max(...all.map((p) => p[1]));
      if (x1 === x0) { x0 = Math.max(0, x0 - 1); x1 = x1 + 1; }
      const pad = (y1 - y0) * 0.08 || Math.abs(y1) * 0.1 || 0.1;
      y0 -= pad; y1 += pad;
      if (y0 < 0 && Math.min(...all.map((p) => p[1])) >= 0) y0 = 0;
      const X = (v) => m.l + ((v - x0) / (x1 - x0)) * (W - m.l - m.r);
      const Y = (v) => m.t + (1 - (v - y0) / (y1 - y0)) * (H - m.t - m.b);

      const yt = niceTicks(y0, y1, 4);
      for (const v of yt.ticks) {
        if (v < y0 || v > y1) continue;
        const y = Y(v).toFixed(1);
        this.grid.append(svg("line", { x1: m.l, x2: W - m.r, y1: y, y2: y }));
        this.axes.append(svg("text", { x: m.l - 6, y, dy: "0.32em", "text-anchor": "end" }, tickLabel(v, yt.step)));
      }
      const xt = niceTicks(x0, x1, Math.max(2, Math.floor((W - m.l - m.r) / 90)), 1); // steps are whole numbers
      for (const v of xt.ticks) {
        if (v < x0 || v > x1) continue;
        const x = X(v).toFixed(1);
        this.axes.append(svg("line", { class: "tick", x1: x, x2: x, y1: H - m.b, y2: H - m.b + 4 }));
        this.axes.append(svg("text", { x, y: H - m.b + 16, "text-anchor": "middle" }, tickLabel(v, Math.max(1, xt.step))));
      }
      this.axes.append(svg("line", { class: "axis", x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b }));
      this.axes.append(svg("text", { class: "axis-title", x: W - m.r, y: H - 2, "text-anchor": "end" }, "step"));

      const line = (pts) => pts.map((p, i) => `${i ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
      this.train.setAttribute("d", line(loss));
      // a line needs two points: a run with one logged loss shows it as a dot
      this.trainDots.replaceChildren(...(loss.length < 3 ? loss : []).map((p) =>
        svg("circle", { cx: X(p[0]).toFixed(1), cy: Y(p[1]).toFixed(1), r: 3 },
          svg("title", null, `step ${p[0]}: training loss ${formatNumber(p[1])}`))));
      if (ev.length) {
        if (!this.evalPath.isConnected) this.svg.append(this.evalPath, this.evalDots);
        this.evalPath.setAttribute("d", line(ev));
        this.evalDots.replaceChildren(...ev.map((p) =>
          svg("circle", { cx: X(p[0]).toFixed(1), cy: Y(p[1]).toFixed(1), r: 3.5 },
            svg("title", null, `step ${p[0]}: held-out loss ${formatNumber(p[1])}`))));
      } else if (this.evalPath.isConnected) {
        this.evalPath.remove();
        this.evalDots.remove();
      }
    }
  }

  // ---------- screens and polling ----------

  const SCREENS = ["runs", "adapters", "playground", "plan"];
  let current = null;
  const screenEnter = {};

  function route() {
    let name = readHash();
    if (!SCREENS.includes(name)) {
      name = "runs";
      history.replaceState(null, "", location.pathname + location.search + "#runs");
    }
    if (name === current) return;
    current = name;
    for (const s of SCREENS) {
      show($(`#screen-${s}`), s === name);
      $(`#nav-${s}`).classList.toggle("active", s === name);
      if (s === name) $(`#nav-${s}`).setAttribute("aria-current", "page");
      else $(`#nav-${s}`).removeAttribute("aria-current");
    }
    if (screenEnter[name]) screenEnter[name]();
  }

  /** A poll loop that runs while `active()` and waits `delay()` ms between rounds; kick() polls now. */
  function poller(fn, delay, active) {
    let timer = null, running = false;
    async function tick() {
      timer = null;
      if (!active()) return;
      running = true;
      try { await fn(); } catch (e) { console.warn(e); }
      running = false;
      if (active() && timer === null) timer = setTimeout(tick, delay());
    }
    return {
      kick() {
        if (timer !== null) { clearTimeout(timer); timer = null; }
        if (!running) tick();
      },
    };
  }

  // ---------- Runs ----------

  const runs = {
    screen: null,
    selected: null,
    list: [],
    chart: null,
    configKeys: [],
    configValues: {},
    active: false,
  };
  const ACTIVE_STATES = new Set(["starting", "running", "stopping"]);

  function badge(node, state, extra) {
    node.className = `${extra ? extra + " " : ""}badge state-${state}`;
    setText(node, state);
  }

  function runRow(run) {
    const row = el("div", { class: "run item", dataset: { name: run.name }, tabindex: "0", role: "button" },
      el("div", { class: "item-top" },
        el("span", { class: "item-name mono" }, run.name),
        el("span", { class: "run-state badge" })),
      el("div", { class: "progress" }, el("div", { class: "progress-fill" })),
      el("div", { class: "item-meta" }, el("span", { class: "run-steps mono" }), el("span", { class: "run-eta mono" })));
    row.addEventListener("click", () => selectRun(run.name));
    row.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); selectRun(run.name); } });
    return row;
  }

  function progressFraction(run) {
    if (run.state === "finished") return 1;
    if (!run.max_steps || run.step === null || run.step === undefined) return 0;
    return Math.min(1, run.step / run.max_steps);
  }

  function stepsText(run) {
    if (run.step === null || run.step === undefined) return run.state === "starting" ? "starting…" : "–";
    return run.max_steps ? `${run.step} / ${run.max_steps}` : `step ${run.step}`;
  }

  function etaText(run) {
    if (ACTIVE_STATES.has(run.state) && run.eta_s !== null && run.eta_s !== undefined) return `ETA ${formatDuration(run.eta_s)}`;
    if (run.state === "finished" && run.elapsed_s) return `took ${formatDuration(run.elapsed_s)}`;
    return "";
  }

  function renderRuns(list) {
    runs.list = list;
    const box = $("#runs-list");
    const existing = new Map($$(".run", box).map((n) => [n.dataset.name, n]));
    let prev = null;
    for (const run of list) {
      let row = existing.get(run.name);
      if (!row) row = runRow(run);
      existing.delete(run.name);
      badge($(".run-state", row), run.state, "run-state");
      const fill = $(".progress-fill", row);
      fill.style.width = `${(progressFraction(run) * 100).toFixed(1)}%`;
      fill.classList.toggle("live", ACTIVE_STATES.has(run.state));
      fill.classList.toggle("done", run.state === "finished");
      fill.classList.toggle("bad", run.state === "failed");
      setText($(".run-steps", row), stepsText(run));
      setText($(".run-eta", row), etaText(run));
      row.classList.toggle("selected", run.name === runs.selected);
      // keep DOM order = list order without touching rows that are already in place
      const want = prev ? prev.nextSibling : box.firstChild;
      if (want !== row) box.insertBefore(row, want);
      prev = row;
    }
    for (const stale of existing.values()) stale.remove();
    show($("#runs-empty"), list.length === 0);
    setText($("#run-none"), list.length ? "Select a run to see its progress, loss curves and log."
      : "A run's progress, loss curves and log show here once it starts.");
    setText($("#runs-count"), list.length ? `${list.length}` : "");
    if (runs.selected && !list.some((r) => r.name === runs.selected)) {
      runs.selected = null;
      renderRunDetail(null);
    }
  }

  function selectRun(name) {
    runs.selected = name;
    for (const row of $$("#runs-list .run")) row.classList.toggle("selected", row.dataset.name === name);
    const run = runs.list.find((r) => r.name === name);
    if (run) renderRunDetail(run, true);
    runs.poll.kick();
  }

  function renderRunDetail(run, fresh) {
    show($("#run-none"), !run);
    show($("#run-body"), !!run);
    if (!run) return;
    if (!runs.chart) runs.chart = new LossChart($("#run-chart"), "No loss logged yet");
    const nameNode = $("#run-name");
    const switched = nameNode.textContent !== run.name;
    setText(nameNode, run.name);
    badge($("#run-badge"), run.state);
    setText($("#run-state"), run.state + (run.exit_code !== null && run.exit_code !== undefined && run.state !== "finished" ? ` (exit ${run.exit_code})` : ""));
    setText($("#run-step"), stepsText(run));
    setText($("#run-eta"), ACTIVE_STATES.has(run.state) ? formatDuration(run.eta_s) : "–");
    setText($("#run-elapsed"), formatDuration(run.elapsed_s));
    const last = run.loss && run.loss.length ? run.loss[run.loss.length - 1][1] : null;
    setText($("#run-last-loss"), last === null ? "–" : formatNumber(last));
    const fill = $("#run-progress");
    fill.style.width = `${(progressFraction(run) * 100).toFixed(1)}%`;
    fill.classList.toggle("live", ACTIVE_STATES.has(run.state));
    fill.classList.toggle("done", run.state === "finished");
    fill.classList.toggle("bad", run.state === "failed");
    const errLine = $("#run-error");
    setText(errLine, run.error ? `error: ${run.error}` : "");
    show(errLine, !!run.error);
    const stop = $("#run-stop"), resume = $("#run-resume");
    stop.disabled = !(run.state === "running" || run.state === "starting") || run.studio === false;
    stop.title = run.studio === false ? "started from a terminal: stop it there" : "";
    resume.disabled = !(run.state === "interrupted" && run.resumable);
    resume.title = run.state === "interrupted" && !run.resumable ? "its config is unknown: resume it from a terminal" : "";
    runs.chart.update(run.loss, run.eval_loss);
    if (run.log_tail !== undefined) {
      const log = $("#run-log");
      const atBottom = switched || fresh || log.scrollHeight - log.scrollTop - log.clientHeight < 24;
      const text = stripAnsi(run.log_tail) || (run.studio ? "(no output yet)" : "(no log: this run was started outside the studio)");
      if (log.textContent !== text) log.textContent = text;
      if (atBottom) log.scrollTop = log.scrollHeight;
    } else if (switched) {
      setText($("#run-log"), "");
    }
  }

  async function pollRuns() {
    let data;
    try {
      data = await api("GET", "/api/runs");
    } catch (e) {
      bannerOnly(runs.screen, e);
      runs.pollFailed = true;
      throw e;
    }
    if (runs.pollFailed) { runs.pollFailed = false; clearErrors(runs.screen); }
    renderRuns(data.runs || []);
    if (!runs.selected && runs.list.length && !runs.autoSelected) {
      runs.autoSelected = true;
      runs.selected = runs.list[0].name;
      renderRuns(runs.list);
    }
    if (runs.selected) {
      try {
        const detail = await api("GET", `/api/runs/${enc(runs.selected)}`);
        if (detail.name === runs.selected) renderRunDetail(detail);
      } catch (e) {
        if (e.status === 404) { runs.selected = null; renderRunDetail(null); } else throw e;
      }
    } else {
      renderRunDetail(null);
    }
  }

  // the new-run form

  async function loadConfigs() {
    const select = $("#run-config");
    try {
      const data = await api("GET", "/api/configs");
      const configs = data.configs || [];
      const keep = select.value;
      select.replaceChildren(el("option", { value: "" }, configs.length ? "Choose a config…" : "No configs found"));
      for (const [source, label] of [["project", "This project"], ["shipped", "Shipped with qtune"]]) {
        const group = configs.filter((c) => c.source === source);
        if (!group.length) continue;
        select.append(el("optgroup", { label },
          group.map((c) => el("option", { value: c.id, title: c.title || "" }, c.name))));
      }
      if (keep && configs.some((c) => c.id === keep)) select.value = keep;
    } catch (e) {
      select.replaceChildren(el("option", { value: "" }, "Configs unavailable"));
      bannerOnly(runs.screen, e);
    }
  }

  function fieldFor(k, value) {
    const name = k.key;
    const hint = k.help || "";
    let input;
    if (k.type === "bool") {
      input = el("input", { type: "checkbox", name, title: hint });
      input.checked = value === true || value === "true";
    } else if (k.type === "choice") {
      const choices = (k.choices || []).map(String);
      if (value !== null && value !== undefined && !choices.includes(String(value))) choices.unshift(String(value));
      input = el("select", { name, title: hint }, choices.map((c) => el("option", { value: c }, c)));
      if (value !== null && value !== undefined) input.value = String(value);
    } else if (Array.isArray(value) || (value !== null && typeof value === "object")) {
      // e.g. data.train as a list of sources: only YAML can write it, so the form shows it and leaves it alone
      input = el("input", { type: "text", name, readonly: true, class: "readonly", dataset: { keep: "true" },
        title: `${hint}${hint ? " — " : ""}a list: edit it in the config file` });
      input.value = Array.isArray(value) ? value.map((v) => (typeof v === "object" ? JSON.stringify(v) : String(v))).join(", ") : JSON.stringify(value);
    } else {
      const numeric = k.type === "int" || k.type === "float";
      input = el("input", {
        type: "text", name, title: hint, spellcheck: "false",
        inputmode: k.type === "int" ? "numeric" : numeric ? "decimal" : null,
        placeholder: value === null || value === undefined ? (k.default !== null && k.default !== undefined ? String(k.default) : hint) : null,
        class: numeric ? "mono" : null,
      });
      input.value = value === null || value === undefined ? "" : String(value);
    }
    const wide = name === "data.train" || name === "model.name";
    const label = el("label", { class: `field${k.type === "bool" ? " field-check" : ""}${wide ? " field-wide" : ""}`, title: hint },
      el("span", { class: "field-label mono" }, name, name === "output.name" ? el("span", { class: "req" }, " *") : null),
      input,
      el("span", { class: "field-error", dataset: { field: name } }));
    return label;
  }

  async function chooseConfig() {
    const id = $("#run-config").value;
    const box = $("#run-fields");
    clearErrors(runs.screen);
    const title = $("#run-config-title");
    if (!id) {
      box.replaceChildren();
      runs.configKeys = [];
      $("#run-start").disabled = true;
      show(title, false);
      setText($("#run-form-hint"), "Pick a config to edit its keys.");
      show($("#run-form-hint"), true);
      return;
    }
    try {
      const data = await api("GET", `/api/configs/${enc(id)}`);
      if ($("#run-config").value !== id) return; // another choice since
      runs.configKeys = data.keys || [];
      runs.configValues = data.values || {};
      box.replaceChildren(...runs.configKeys.map((k) => fieldFor(k, runs.configValues[k.key])));
      const opt = $("#run-config").selectedOptions[0];
      setText(title, opt && opt.title ? opt.title : "");
      show(title, !!(opt && opt.title));
      $("#run-start").disabled = false;
      show($("#run-form-hint"), false);
    } catch (e) {
      box.replaceChildren();
      $("#run-start").disabled = true;
      showError(runs.screen, e.field ? e : new ApiError(e.status, e.message, "config"));
    }
  }

  async function startRun(event) {
    event.preventDefault();
    const id = $("#run-config").value;
    clearErrors(runs.screen);
    if (!id) { showError(runs.screen, new ApiError(400, "choose a config first", "config")); return; }
    const values = {};
    for (const k of runs.configKeys) {
      const input = $(`[name="${CSS.escape(k.key)}"]`, $("#run-form"));
      if (!input) continue;
      if (input.dataset.keep) continue;
      if (input.type === "checkbox") { values[k.key] = input.checked; continue; }
      const v = input.value.trim();
      const original = runs.configValues[k.key];
      // a key the config leaves unset (null) and the user left empty: nothing to send
      if (v === "" && (original === null || original === undefined)) continue;
      values[k.key] = v;
    }
    if (!values["output.name"]) {
      showError(runs.screen, new ApiError(400, "give the run a name (its folder under the output folder)", "output.name"));
      return;
    }
    const button = $("#run-start");
    button.disabled = true;
    try {
      const run = await api("POST", "/api/runs", { config: id, values });
      runs.selected = run.name || values["output.name"];
      // started: fold the form back to its config select, so the list and the new run are in view
      $("#run-config").value = "";
      await chooseConfig();
      setText($("#run-form-hint"), `Started ${runs.selected}. Pick a config to start another.`);
      runs.poll.kick();
    } catch (e) {
      showError(runs.screen, e);
    } finally {
      button.disabled = !$("#run-config").value;
    }
  }

  async function runAction(verb) {
    const name = runs.selected;
    if (!name) return;
    const button = $(`#run-${verb}`);
    button.disabled = true;
    clearErrors(runs.screen);
    try {
      const run = await api("POST", `/api/runs/${enc(name)}/${verb}`, {});
      if (run && run.name === name) renderRunDetail({ ...runs.list.find((r) => r.name === name), ...run });
    } catch (e) {
      bannerOnly(runs.screen, e);
    }
    runs.poll.kick();
  }

  function initRuns() {
    runs.screen = $("#screen-runs");
    runs.poll = poller(pollRuns,
      () => (runs.list.some((r) => ACTIVE_STATES.has(r.state)) ? 1000 : 5000),
      () => current === "runs");
    $("#run-config").addEventListener("change", chooseConfig);
    $("#run-form").addEventListener("submit", startRun);
    $("#run-stop").addEventListener("click", () => runAction("stop"));
    $("#run-resume").addEventListener("click", () => runAction("resume"));
    $("#run-form").addEventListener("input", (e) => {
      const slot = e.target.parentElement && e.target.parentElement.querySelector(".field-error");
      if (slot && slot.textContent) { setText(slot, ""); e.target.classList.remove("has-error"); }
    });
    let configsLoaded = false;
    screenEnter.runs = () => {
      if (!configsLoaded) { configsLoaded = true; loadConfigs(); }
      runs.poll.kick();
    };
  }

  // ---------- Adapters ----------

  const adapters = { screen: null, list: [], selected: null, chart: null, job: null, jobTimer: null, detail: null };

  function mainMetric(metrics) {
    if (!metrics || typeof metrics !== "object") return "";
    for (const key of ["accuracy", "macro_f1", "eval_loss", "loss", "perplexity"]) {
      if (typeof metrics[key] === "number") return `${key.replace("_", " ")} ${formatNumber(metrics[key])}`;
    }
    const first = Object.entries(metrics).find(([, v]) => typeof v === "number");
    return first ? `${first[0]} ${formatNumber(first[1])}` : "";
  }

  function renderAdapterList(data) {
    const list = data.adapters || [];
    adapters.list = list;
    const box = $("#adapters-list");
    const rows = list.map((a) => {
      const row = el("div", { class: "adapter item", dataset: { name: a.name }, tabindex: "0", role: "button" },
        el("div", { class: "item-top" },
          el("span", { class: "item-name mono" }, a.name),
          el("span", { class: `badge kind-${a.kind}` }, a.kind === "classifier" ? "classifier" : "causal lm")),
        el("div", { class: "item-sub muted small" }, a.base || ""),
        el("div", { class: "item-meta" },
          el("span", { class: "small" }, [a.method, a.steps !== null && a.steps !== undefined ? `${a.steps} steps` : null].filter(Boolean).join(" · ")),
          el("span", { class: "mono small metric" }, mainMetric(a.metrics))));
      row.classList.toggle("selected", a.name === adapters.selected);
      row.addEventListener("click", () => selectAdapter(a.name));
      row.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); selectAdapter(a.name); } });
      return row;
    });
    const scroll = box.scrollTop;
    box.replaceChildren(...rows);
    box.scrollTop = scroll;
    show($("#adapters-empty"), list.length === 0);
    const skipped = data.skipped || [];
    const note = $("#adapters-skipped");
    setText(note, skipped.length ? `Skipped: ${skipped.map((s) => `${s.name} (${s.reason})`).join("; ")}` : "");
    show(note, skipped.length > 0);
    if (adapters.selected && !list.some((a) => a.name === adapters.selected)) {
      adapters.selected = null;
      renderAdapterDetail(null);
    } else if (!adapters.selected && list.length) {
      selectAdapter(list[0].name);
    }
  }

  async function loadAdapters() {
    try {
      renderAdapterList(await api("GET", "/api/adapters"));
    } catch (e) {
      bannerOnly(adapters.screen, e);
    }
  }

  async function selectAdapter(name) {
    const changed = adapters.selected !== name;
    adapters.selected = name;
    for (const row of $$("#adapters-list .adapter")) row.classList.toggle("selected", row.dataset.name === name);
    clearErrors(adapters.screen);
    try {
      const detail = await api("GET", `/api/adapters/${enc(name)}`);
      if (adapters.selected !== name) return;
      renderAdapterDetail(detail, changed);
    } catch (e) {
      bannerOnly(adapters.screen, e);
    }
  }

  function metricRows(metrics) {
    const rows = [];
    for (const [k, v] of Object.entries(metrics || {})) {
      if (["confusion", "labels", "per_class"].includes(k)) continue;
      if (v === null || typeof v === "object") {
        if (v && !Array.isArray(v)) {
          for (const [k2, v2] of Object.entries(v)) {
            if (typeof v2 !== "object" || v2 === null) rows.push([`${k}.${k2}`, v2]);
          }
        }
        continue;
      }
      rows.push([k, v]);
    }
    return rows;
  }

  /** Precision, recall, F1 and support per label, from the confusion matrix (rows: true, columns: predicted). */
  function perClassFrom(conf) {
    const out = {};
    conf.labels.forEach((label, i) => {
      const tp = (conf.matrix[i] || [])[i] || 0;
      const support = (conf.matrix[i] || []).reduce((s, x) => s + x, 0);
      const predicted = conf.matrix.reduce((s, row) => s + (row[i] || 0), 0);
      const precision = predicted ? tp / predicted : 0, recall = support ? tp / support : 0;
      const f1 = precision + recall ? (2 * precision * recall) / (precision + recall) : 0;
      out[label] = { precision, recall, f1, support };
    });
    return out;
  }

  function renderAdapterDetail(a, changed) {
    show($("#adapter-none"), !a);
    show($("#adapter-body"), !!a);
    adapters.detail = a;
    if (!a) return;
    if (!adapters.chart) adapters.chart = new LossChart($("#adapter-chart"), "No loss curve recorded");
    setText($("#adapter-name"), a.name);
    const kind = $("#adapter-kind");
    kind.className = `badge kind-${a.kind}`;
    setText(kind, a.kind === "classifier" ? "classifier" : "causal lm");

    const info = [["Base", a.base], ["Method", a.method], ["Data", a.data],
      ["Examples", a.examples === null || a.examples === undefined ? "–" : formatNumber(a.examples)],
      ["Steps", a.steps === null || a.steps === undefined ? "–" : formatNumber(a.steps)], ["Created", formatDate(a.created)]];
    $("#adapter-info").replaceChildren(...info.map(([k, v]) =>
      el("div", { class: "info" }, el("dt", null, k), el("dd", { class: "mono" }, v === null || v === undefined || v === "" ? "–" : String(v)))));

    const rows = metricRows(a.metrics);
    $("#adapter-metrics").replaceChildren(el("tbody", null, rows.length ? rows.map(([k, v]) =>
      el("tr", null, el("th", null, k), el("td", { class: "mono num" }, typeof v === "number" ? formatNumber(v) : String(v))))
      : el("tr", null, el("td", { class: "muted" }, "No held-out metrics: the run had no eval data."))));

    adapters.chart.update(a.loss, a.eval_loss);

    // confusion matrix: rows = true label, columns = predicted; the cell's shade = its share of the row
    const conf = a.confusion;
    const hasConf = !!(conf && Array.isArray(conf.labels) && Array.isArray(conf.matrix) && conf.labels.length);
    show($("#adapter-confusion-box"), hasConf);
    if (hasConf) {
      const head = el("tr", null, el("th", { class: "corner" }, "true \\ predicted"), conf.labels.map((l) => el("th", { class: "mono" }, l)));
      const body = conf.matrix.map((row, i) => {
        const sum = row.reduce((s, x) => s + x, 0) || 1;
        return el("tr", null, el("th", { class: "mono" }, conf.labels[i]), row.map((n, j) => {
          const share = n / sum;
          const bucket = Math.min(5, Math.ceil(share * 5));
          return el("td", { class: `mono num heat heat-${bucket}${i === j ? " diag" : ""}`, title: `${(share * 100).toFixed(1)}% of ${conf.labels[i]}` }, String(n));
        }));
      });
      $("#adapter-confusion").replaceChildren(el("thead", null, head), el("tbody", null, body));
    } else {
      $("#adapter-confusion").replaceChildren();
    }
    const perClass = (a.metrics && a.metrics.per_class) || (hasConf ? perClassFrom(conf) : null);
    const hasPer = perClass && typeof perClass === "object" && Object.keys(perClass).length > 0;
    show($("#adapter-per-class-box"), !!hasPer);
    if (hasPer) {
      const cols = ["precision", "recall", "f1", "support"];
      $("#adapter-per-class").replaceChildren(
        el("thead", null, el("tr", null, el("th", null, "label"), cols.map((c) => el("th", { class: "num" }, c)))),
        el("tbody", null, Object.entries(perClass).map(([label, m]) =>
          el("tr", null, el("th", { class: "mono" }, label), cols.map((c) => el("td", { class: "mono num" }, m && m[c] !== undefined ? formatNumber(m[c]) : "–"))))));
    }

    const samples = Array.isArray(a.samples) ? a.samples : [];
    show($("#adapter-samples-box"), a.kind !== "classifier" || samples.length > 0);
    $("#adapter-samples").replaceChildren(...(samples.length ? samples.map((s) => {
      const right = typeof s.correct === "boolean" ? s.correct : s.reference !== undefined && s.answer !== undefined &&
        String(s.answer).trim().toLowerCase() === String(s.reference).trim().toLowerCase();
      const prompt = s.prompt === null || s.prompt === undefined
        ? el("pre", { class: "sample-text muted" }, s.row !== undefined ? `(not recorded: held-out row ${s.row})` : "(not recorded)")
        : el("pre", { class: "sample-text" }, String(s.prompt));
      return el("div", { class: `sample${right ? " right" : ""}` },
        el("div", { class: "sample-part" }, el("span", { class: "sample-label" }, "prompt"), prompt),
        el("div", { class: "sample-pair" },
          el("div", { class: "sample-part" }, el("span", { class: "sample-label" }, "reference"), el("pre", { class: "sample-text" }, s.reference === null || s.reference === undefined ? "" : String(s.reference))),
          el("div", { class: "sample-part" }, el("span", { class: "sample-label" }, "answer"), el("pre", { class: "sample-text answer" }, s.answer === null || s.answer === undefined ? "" : String(s.answer)))));
    }) : [el("p", { class: "muted small" }, "No samples recorded (no held-out prompts with answers).")]));

    const files = Array.isArray(a.files) ? a.files : [];
    $("#adapter-files").replaceChildren(el("tbody", null, files.map((f) =>
      el("tr", null, el("td", { class: "mono" }, f.name), el("td", { class: "mono num" }, formatBytes(f.size))))));

    if (changed) {
      stopJob();
      show($("#export-status"), false);
      show($("#push-result"), false);
      $("#push-repo").value = "";
      $("#push-license").value = "";
    }
  }

  async function deleteAdapter() {
    const name = adapters.selected;
    if (!name) return;
    if (!confirm(`Delete the adapter ${name}? Its folder is removed from disk.`)) return;
    clearErrors(adapters.screen);
    try {
      await api("DELETE", `/api/adapters/${enc(name)}`, {});
      adapters.selected = null;
      renderAdapterDetail(null);
      await loadAdapters();
    } catch (e) {
      bannerOnly(adapters.screen, e);
    }
  }

  function syncExportType() {
    show($("#export-type-field"), $("#export-format").value !== "peft");
  }

  function stopJob() {
    if (adapters.jobTimer) clearTimeout(adapters.jobTimer);
    adapters.jobTimer = null;
    adapters.job = null;
  }

  async function pollJob(id) {
    if (adapters.job !== id) return;
    try {
      const job = await api("GET", `/api/jobs/${enc(id)}`);
      if (adapters.job !== id) return;
      const state = $("#export-state");
      state.className = `badge state-${job.state === "done" ? "finished" : job.state}`;
      setText(state, job.state);
      setText($("#export-out"), job.out ? `→ ${job.out}` : "");
      const log = $("#export-log");
      const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 24;
      setText(log, stripAnsi(job.log));
      show(log, !!job.log);
      if (atBottom) log.scrollTop = log.scrollHeight;
      if (job.state === "running") adapters.jobTimer = setTimeout(() => pollJob(id), 1000);
      else { $("#export-go").disabled = false; adapters.job = null; }
    } catch (e) {
      bannerOnly(adapters.screen, e);
      $("#export-go").disabled = false;
    }
  }

  async function startExport() {
    const name = adapters.selected;
    if (!name) return;
    clearErrors(adapters.screen);
    const format = $("#export-format").value;
    const body = { format };
    if (format !== "peft") body.type = $("#export-type").value;
    const go = $("#export-go");
    go.disabled = true;
    try {
      const { job } = await api("POST", `/api/adapters/${enc(name)}/export`, body);
      stopJob();
      adapters.job = job;
      show($("#export-status"), true);
      const state = $("#export-state");
      state.className = "badge state-running";
      setText(state, "running");
      setText($("#export-out"), "");
      setText($("#export-log"), "");
      pollJob(job);
    } catch (e) {
      showError(adapters.screen, e);
      go.disabled = false;
    }
  }

  async function pushPreview() {
    const name = adapters.selected;
    if (!name) return;
    clearErrors(adapters.screen);
    const repo = $("#push-repo").value.trim();
    if (!repo) { showError(adapters.screen, new ApiError(400, "give the repo id, like you/name", "repo_id")); return; }
    const body = { repo_id: repo };
    const license = $("#push-license").value.trim();
    if (license) body.license = license;
    const go = $("#push-go");
    go.disabled = true;
    try {
      const data = await api("POST", `/api/adapters/${enc(name)}/push-preview`, body);
      const files = data.files || [];
      $("#push-files").replaceChildren(
        el("thead", null, el("tr", null, el("th", null, `would upload to ${repo}`), el("th", { class: "num" }, "size"))),
        el("tbody", null, files.map((f) => el("tr", null, el("td", { class: "mono" }, f.name), el("td", { class: "mono num" }, formatBytes(f.size))))));
      setText($("#push-card"), data.card || "");
      show($("#push-result"), true);
    } catch (e) {
      showError(adapters.screen, e);
    } finally {
      go.disabled = false;
    }
  }

  function initAdapters() {
    adapters.screen = $("#screen-adapters");
    $("#adapters-refresh").addEventListener("click", () => { clearErrors(adapters.screen); loadAdapters(); if (adapters.selected) selectAdapter(adapters.selected); });
    $("#adapter-delete").addEventListener("click", deleteAdapter);
    $("#export-format").addEventListener("change", syncExportType);
    $("#export-go").addEventListener("click", startExport);
    $("#push-go").addEventListener("click", pushPreview);
    $("#push-repo").addEventListener("keydown", (e) => { if (e.key === "Enter") pushPreview(); });
    syncExportType();
    screenEnter.adapters = loadAdapters;
  }

  // ---------- Playground ----------

  const pg = { screen: null, state: null, models: [], timer: null, streams: [] , checked: null };
  const MAX_MODELS = 4;

  function renderPlayground(data) {
    pg.state = data.state;
    const state = $("#pg-state");
    state.className = `badge pgstate-${data.state}`;
    setText(state, data.state === "loading" ? "loading…" : data.state);
    setText($("#pg-base"), data.base ? `base: ${data.base}` : "");
    const ready = data.state === "ready";
    show($("#pg-idle"), !ready);
    show($("#pg-ready"), ready);
    const load = $("#pg-load");
    load.disabled = data.state === "loading";
    // once loaded, Load again registers the adapters trained since
    setText(load, { loading: "Loading…", failed: "Try again", ready: "Reload adapters" }[data.state] || "Load");
    load.classList.toggle("primary", !ready);
    load.title = ready ? "register the adapters trained since the last load" : "";
    setText($("#pg-idle-text"), data.state === "loading"
      ? "Loading the base model and its adapters…"
      : "Press Load to load the base model with the adapters trained on it, then compare their answers side by side.");
    const errLine = $("#pg-error");
    setText(errLine, data.error ? `error: ${data.error}` : "");
    show(errLine, !!data.error);

    const skipped = data.skipped || [];
    setText($("#pg-skipped"), skipped.length ? `Not loaded: ${skipped.map((s) => `${s.name} (${s.reason})`).join("; ")}` : "");
    show($("#pg-skipped"), skipped.length > 0);

    const models = data.models || [];
    const sameModels = JSON.stringify(models.map((m) => [m.id, m.kind])) === JSON.stringify(pg.models.map((m) => [m.id, m.kind]));
    pg.models = models;
    if (!ready || sameModels && $("#pg-models").childElementCount) return;
    const before = pg.checked || new Set(["base", ...models.filter((m) => m.id !== "base").slice(0, 1).map((m) => m.id)]);
    $("#pg-models").replaceChildren(...models.map((m) => {
      const box = el("input", { type: "checkbox", value: m.id });
      box.checked = before.has(m.id);
      return el("label", { class: "pg-model", title: m.system_prompt ? `system prompt: ${m.system_prompt}` : "" },
        box, el("span", { class: "mono" }, m.id),
        m.id === "base" ? el("span", { class: "muted small" }, "no adapter")
          : el("span", { class: `badge kind-${m.kind}` }, m.kind === "classifier" ? "classifier" : "adapter"));
    }));
    syncChecks();
  }

  function checkedModels() {
    return $$("#pg-models input[type=checkbox]").filter((b) => b.checked).map((b) => b.value);
  }

  function syncChecks() {
    const boxes = $$("#pg-models input[type=checkbox]");
    const n = boxes.filter((b) => b.checked).length;
    for (const b of boxes) {
      b.disabled = !b.checked && n >= MAX_MODELS;
      b.parentElement.classList.toggle("disabled", b.disabled);
      b.parentElement.classList.toggle("checked", b.checked);
    }
    pg.checked = new Set(boxes.filter((b) => b.checked).map((b) => b.value));
    $("#pg-send").disabled = n === 0;
  }

  async function pollPlayground() {
    if (pg.timer) clearTimeout(pg.timer);
    pg.timer = null;
    try {
      renderPlayground(await api("GET", "/api/playground"));
    } catch (e) {
      bannerOnly(pg.screen, e);
    }
    if (pg.state === "loading" && current === "playground") pg.timer = setTimeout(pollPlayground, 1000);
  }

  async function loadPlayground() {
    clearErrors(pg.screen);
    $("#pg-load").disabled = true;
    try {
      await api("POST", "/api/playground/load", {});
    } catch (e) {
      bannerOnly(pg.screen, e);
    }
    pollPlayground();
  }

  function answerColumn(model) {
    const classifier = model.kind === "classifier";
    return el("div", { class: "card pg-answer", dataset: { model: model.id } },
      el("div", { class: "pg-answer-head" },
        el("span", { class: "mono pg-answer-name" }, model.id),
        el("span", { class: "pg-spinner", title: "answering" })),
      el("div", { class: "pg-system muted small" }, classifier ? "classifier: label probabilities" :
        model.system_prompt ? `system: ${model.system_prompt}` : "no system prompt"),
      classifier ? el("div", { class: "pg-probs" }) : el("div", { class: "pg-text" }),
      el("div", { class: "pg-foot muted small mono" }));
  }

  function finish(column, error, foot) {
    column.dataset.done = "true";
    column.classList.remove("streaming");
    if (error) {
      column.classList.add("failed");
      column.append(el("p", { class: "error-line" }, error));
    }
    if (foot) setText($(".pg-foot", column), foot);
  }

  async function streamChat(column, model, prompt, maxTokens, signal) {
    const text = $(".pg-text", column);
    const started = performance.now();
    let finishReason = null;
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(true), signal,
        body: JSON.stringify({ model: model.id, messages: [{ role: "user", content: prompt }], stream: true, max_tokens: maxTokens }),
      });
      if (!response.ok) throw await errorFrom(response);
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "", done = false;
      while (!done) {
        const { value, done: end } = await reader.read();
        if (end) break;
        buffer += decoder.decode(value, { stream: true });
        let nl;
        while ((nl = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, nl).replace(/\r$/, "");
          buffer = buffer.slice(nl + 1);
          if (!line.startsWith("data:")) continue;
          const payload = line.slice(5).trim();
          if (payload === "[DONE]") { done = true; break; }
          let chunk;
          try { chunk = JSON.parse(payload); } catch (_) { continue; }
          if (chunk.error) throw new ApiError(0, chunk.error.message || "the model failed");
          const choice = chunk.choices && chunk.choices[0];
          if (!choice) continue;
          if (choice.delta && choice.delta.content) {
            text.append(document.createTextNode(choice.delta.content));
          }
          if (choice.finish_reason) finishReason = choice.finish_reason;
        }
      }
      if (done) reader.cancel().catch(() => {});
      const secs = (performance.now() - started) / 1000;
      if (!text.textContent) text.classList.add("empty-answer");
      const why = { length: "max tokens reached", stop: "finished", timeout: "timed out" }[finishReason] || finishReason;
      finish(column, null, `${secs.toFixed(1)} s${why ? ` · ${why}` : ""}`);
    } catch (e) {
      if (e.name === "AbortError") finish(column, null, "cancelled");
      else finish(column, e.message || String(e));
    }
  }

  async function classify(column, model, prompt, signal) {
    const box = $(".pg-probs", column);
    try {
      const response = await fetch("/v1/classify", {
        method: "POST", headers: headers(true), signal, body: JSON.stringify({ model: model.id, input: prompt }),
      });
      if (!response.ok) throw await errorFrom(response);
      const data = await response.json();
      const first = (data.data || [])[0] || {};
      const probs = Object.entries(first.probabilities || {}).sort((a, b) => b[1] - a[1]);
      box.replaceChildren(...probs.map(([label, p]) => {
        const fill = el("div", { class: "prob-fill" });
        fill.style.width = `${(p * 100).toFixed(1)}%`;
        return el("div", { class: `pg-prob${label === first.label ? " top" : ""}`, dataset: { label } },
          el("span", { class: "prob-label mono" }, label),
          el("div", { class: "prob-bar" }, fill),
          el("span", { class: "prob-value mono" }, `${(p * 100).toFixed(1)}%`));
      }));
      finish(column, null, first.label !== undefined ? `label: ${first.label}` : "");
    } catch (e) {
      if (e.name === "AbortError") finish(column, null, "cancelled");
      else finish(column, e.message || String(e));
    }
  }

  function send() {
    clearErrors(pg.screen);
    const prompt = $("#pg-prompt").value;
    if (!prompt.trim()) { showError(pg.screen, new ApiError(400, "write a prompt first", "prompt")); return; }
    const ids = checkedModels();
    if (!ids.length) { bannerOnly(pg.screen, new Error("check at least one model")); return; }
    let maxTokens = parseInt($("#pg-max-tokens").value, 10);
    if (!(maxTokens > 0)) { maxTokens = 64; $("#pg-max-tokens").value = "64"; }
    for (const c of pg.streams) c.abort();
    const controller = new AbortController();
    pg.streams = [controller];
    const models = ids.map((id) => pg.models.find((m) => m.id === id)).filter(Boolean);
    const answers = $("#pg-answers");
    answers.className = `pg-answers cols-${models.length}`;
    const columns = models.map(answerColumn);
    answers.replaceChildren(...columns);
    // every column starts at once: the server batches them
    models.forEach((m, i) => {
      columns[i].classList.add("streaming");
      if (m.kind === "classifier") classify(columns[i], m, prompt, controller.signal);
      else streamChat(columns[i], m, prompt, maxTokens, controller.signal);
    });
  }

  function initPlayground() {
    pg.screen = $("#screen-playground");
    $("#pg-load").addEventListener("click", loadPlayground);
    $("#pg-models").addEventListener("change", syncChecks);
    $("#pg-send").addEventListener("click", send);
    $("#pg-prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); send(); } });
    screenEnter.playground = pollPlayground;
  }

  // ---------- Plan ----------

  const plan = { screen: null, loaded: false };

  async function loadPlanModels() {
    try {
      const data = await api("GET", "/api/plan/models");
      const select = $("#plan-model");
      const keep = select.value;
      const models = data.models || [];
      select.replaceChildren(...models.map((m) => el("option", { value: m }, m)));
      if (keep && models.includes(keep)) select.value = keep;
      else if (models.includes("llama-3.1-8b")) select.value = "llama-3.1-8b";
      plan.loaded = true;
    } catch (e) {
      bannerOnly(plan.screen, e);
    }
  }

  function renderPlan(p) {
    show($("#plan-none"), false);
    show($("#plan-body"), true);
    const parts = p.parts || [];
    const total = p.total_bytes || parts.reduce((s, x) => s + x.bytes, 0);
    const vram = p.vram_bytes || 0;
    const scale = Math.max(total, vram) || 1;
    const bar = $("#plan-bar");
    const marker = $(".plan-vram", bar);
    for (const old of $$(".plan-part", bar)) old.remove();
    parts.forEach((part, i) => {
      const seg = el("div", { class: `plan-part c${i % 10}${part.bytes ? "" : " zero"}`, dataset: { part: part.name }, title: `${part.name}: ${gib(part.bytes)}` });
      seg.style.width = `${((part.bytes / scale) * 100).toFixed(3)}%`;
      bar.insertBefore(seg, marker);
    });
    bar.classList.toggle("over", vram > 0 && total > vram);
    show(marker, vram > 0);
    if (vram > 0) {
      marker.style.left = `${((vram / scale) * 100).toFixed(3)}%`;
      setText($(".plan-vram-label", marker), `card ${gib(vram)}`);
      marker.classList.toggle("flip", vram / scale > 0.8);
    }
    setText($("#plan-scale-max"), gib(scale));
    $("#plan-legend").replaceChildren(...parts.map((part, i) =>
      el("li", { class: part.bytes ? "" : "zero" }, el("span", { class: `swatch c${i % 10}` }), el("span", { class: "legend-name" }, part.name),
        el("span", { class: "mono legend-value" }, gib(part.bytes)))));
    const verdict = $("#plan-verdict");
    verdict.className = `verdict ${p.fits === true ? "fits" : p.fits === false ? "nofit" : "unknown"}`;
    setText(verdict, p.fits === true ? "fits" : p.fits === false ? "does not fit" : "no VRAM given");
    setText($("#plan-total"), `${gib(total)}${vram ? ` of ${gib(vram)}` : ""}`);
    // longest_seq is what fits at micro-batch 1 with every layer checkpointed (what train.fit_to_vram falls back to)
    setText($("#plan-longest"), p.longest_seq !== null && p.longest_seq !== undefined
      ? `longest sequence that fits: ${p.longest_seq.toLocaleString("en-US")} tokens${p.longest_seq > 0 ? "" : " (none fits)"}`
      : "");
    $("#plan-longest").title = "at micro-batch 1 with gradient checkpointing (what train.fit_to_vram falls back to)";
    show($("#plan-longest-note"), p.longest_seq !== null && p.longest_seq !== undefined);
    setText($("#plan-text"), p.text || "");
  }

  async function runPlan(event) {
    if (event) event.preventDefault();
    clearErrors(plan.screen);
    const intOf = (id) => { const v = $(id).value.trim(); return /^\d+$/.test(v) ? parseInt(v, 10) : v; };
    const body = {
      model: $("#plan-model").value, vram: $("#plan-vram").value.trim(),
      seq: intOf("#plan-seq"), lora_r: intOf("#plan-rank"), quant: $("#plan-quant").value, batch: intOf("#plan-batch"),
      gradient_checkpointing: $("#plan-checkpointing").value,
    };
    if (!body.model) { showError(plan.screen, new ApiError(400, "choose a model", "model")); return; }
    const go = $("#plan-go");
    go.disabled = true;
    try {
      renderPlan(await api("POST", "/api/plan", body));
    } catch (e) {
      showError(plan.screen, e);
    } finally {
      go.disabled = false;
    }
  }

  function initPlan() {
    plan.screen = $("#screen-plan");
    $("#plan-form").addEventListener("submit", runPlan);
    screenEnter.plan = () => { if (!plan.loaded) loadPlanModels(); };
  }

  // ---------- start ----------

  async function loadInfo() {
    try {
      const info = await api("GET", "/api/info");
      const box = $("#project-info");
      box.replaceChildren(
        el("span", { class: "mono", title: info.project }, info.project),
        info.version ? el("span", { class: "muted" }, `v${info.version}`) : null);
    } catch (e) {
      const box = $("#project-info");
      box.replaceChildren(el("span", { class: "warn" }, e.status === 401 ? "token needed" : "studio unreachable"));
    }
  }

  function init() {
    initRuns();
    initAdapters();
    initPlayground();
    initPlan();
    window.addEventListener("hashchange", route);
    route();
    loadInfo();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
