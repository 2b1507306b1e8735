// qtune studio: the Runs screen (docs/studio.md, Runs): the list of runs with live progress, a run's detail
// (loss curves, log tail, stop / resume) and the new-run form built from a config's keys.
"use strict";

(function (studio) {
  const { $, $$, el, setText, show, formatDuration, stripAnsi, formatNumber, ApiError, api, enc, clearErrors,
    showError, bannerOnly, poller, screenEnter, LossChart } = studio;

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
      () => studio.current() === "runs");
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

  studio.initRuns = initRuns;
})(window.qtuneStudio);
