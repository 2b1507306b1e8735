// qtune studio, the core every screen shares (docs/studio.md): the `el` helper, formatting, api() with the token
// and JSON headers, errors beside a field or in a screen's banner, the hash router and the poll loop.
// Plain ES2020, no framework, no build step, no modules: index.html loads core.js, chart.js, one file per screen,
// then main.js, each a <script defer> (so in that order), and they share the one global `qtuneStudio`.
// Every element is built with createElement + textContent: nothing from data, logs or model output is parsed as HTML.
"use strict";

window.qtuneStudio = (function () {
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

  // ---------- screens and polling ----------

  const SCREENS = ["runs", "adapters", "playground", "plan"];
  let current = null;
  const screenEnter = {}; // a screen's file sets screenEnter.<name>: what to do each time it comes into view

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

  return {
    $, $$, el, svg, setText, show,
    formatDuration, formatBytes, formatNumber, formatDate, stripAnsi, gib,
    ApiError, headers, errorFrom, api, enc,
    clearErrors, showError, bannerOnly,
    route, poller, screenEnter,
    /** The screen in view ("runs", "adapters", "playground", "plan"): a screen's polling stops when it is not. */
    current: () => current,
  };
})();
