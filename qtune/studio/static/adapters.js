// qtune studio: the Adapters screen (docs/studio.md, Adapters): the list, an adapter's metrics, loss curve,
// confusion matrix, samples and files; delete, export (a `qtune export` job) and the push preview.
"use strict";

(function (studio) {
  const { $, $$, el, setText, show, formatBytes, stripAnsi, formatNumber, formatDate, ApiError, api, enc,
    clearErrors, showError, bannerOnly, screenEnter, LossChart } = studio;

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

  studio.initAdapters = initAdapters;
})(window.qtuneStudio);
