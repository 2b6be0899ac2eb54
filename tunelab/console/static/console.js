// tunelab console: a little vanilla JS over server-rendered pages. Every state-changing request sends the
// session's CSRF token (X-CSRF-Token); live job updates arrive by server-sent events (no polling here).
"use strict";
const tl = (() => {
  const csrf = document.querySelector('meta[name="csrf-token"]')?.content || "";
  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

  function flash(message, kind = "error") {
    const el = $("#flash");
    el.textContent = message;
    el.className = "flash " + kind;
    el.hidden = false;
  }

  async function api(path, body) {
    const opts = { method: "POST", headers: { "X-CSRF-Token": csrf }, credentials: "same-origin" };
    if (body instanceof FormData) opts.body = body;
    else { opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body || {}); }
    const r = await fetch(path, opts);
    const data = await r.json().catch(() => ({}));
    if (!r.ok) {
      const e = data.error || {};
      throw new Error((e.param ? e.param + ": " : "") + (e.message || r.statusText));
    }
    return data;
  }

  function times() {
    for (const el of $$(".time[data-t]")) {
      const t = Number(el.dataset.t);
      if (t) el.textContent = new Date(t * 1000).toLocaleString();
    }
  }
  document.addEventListener("DOMContentLoaded", times);

  const num = (v) => (v === "" || v === "auto" ? v : Number(v));

  // ------------------------------------------------------------------ jobs
  function jobsPage() {
    const form = $("#new-job");
    if (!form) return;
    if ($("#jobs")) {  // live statuses: one event stream for the list
      const es = new EventSource("/console/api/jobs-stream");
      es.addEventListener("jobs", (m) => {
        for (const j of JSON.parse(m.data)) {
          const tr = $(`tr[data-job="${j.id}"]`);
          if (!tr) continue;
          const st = $(".status", tr);
          st.textContent = j.status; st.className = "status " + j.status;
          $(".ft", tr).textContent = j.fine_tuned_model || "";
          $(".step", tr).textContent = j.total_steps ? `${j.step}/${j.total_steps}` : String(j.step);
        }
      });
    }
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const f = Object.fromEntries(new FormData(form));
      const type = f.method;
      const hp = {};
      for (const k of ["n_epochs", "batch_size", "learning_rate_multiplier"]) if (f[k] !== "") hp[k] = num(f[k]);
      if (type === "dpo" && f.beta !== "") hp.beta = num(f.beta);
      const opts = {};
      if (f.finetune) opts.finetune = f.finetune;
      for (const k of ["lora_r", "max_steps", "eval_every"]) if (f[k] !== "") opts[k] = num(f[k]);
      const body = { model: f.model, training_file: f.training_file, method: { type, [type]: { hyperparameters: hp } } };
      if (f.validation_file) body.validation_file = f.validation_file;
      if (f.suffix) body.suffix = f.suffix;
      if (f.seed !== "") body.seed = num(f.seed);
      if (Object.keys(opts).length) body.tunelab = opts;
      try {
        const job = await api("/console/api/jobs", body);
        location.href = "/console/jobs/" + job.id;
      } catch (e) { flash(e.message); }
    });
  }

  function jobPage(id) {
    const steps = new Map(); // step -> {train, valid}
    let baseline = null;
    let chart = null;
    const chartEl = $("#chart");

    function best() {
      let b = null;
      for (const [s, m] of steps) if (m.valid != null && (b === null || m.valid < steps.get(b).valid)) b = s;
      return b;
    }

    function redraw() {
      const xs = Array.from(steps.keys()).sort((a, b) => a - b);
      if (baseline !== null && !xs.includes(0)) xs.unshift(0);
      const train = xs.map((s) => steps.get(s)?.train ?? null);
      const valid = xs.map((s) => (s === 0 && baseline !== null ? baseline : steps.get(s)?.valid ?? null));
      const base = xs.map(() => baseline);
      const b = best();
      $("#best").textContent = b === null ? "–" : `step ${b}: validation loss ${steps.get(b).valid.toFixed(4)}`;
      const tbody = $("#metrics tbody");
      tbody.replaceChildren(...xs.filter((s) => steps.has(s)).map((s) => {
        const m = steps.get(s), tr = document.createElement("tr");
        if (s === b) tr.className = "best";
        for (const v of [s, m.train?.toFixed(4), m.valid?.toFixed(4), m.lr?.toExponential(2)]) {
          const td = document.createElement("td"); td.textContent = v ?? ""; tr.append(td);
        }
        return tr;
      }));
      if (!chartEl || typeof uPlot === "undefined") return;
      const data = [xs, train, valid, base];
      if (chart) { chart.setData(data); return; }
      const bestLine = {
        hooks: {
          draw: [(u) => {
            const s = best();
            if (s === null) return;
            const x = u.valToPos(s, "x", true), ctx = u.ctx;
            ctx.save(); ctx.strokeStyle = "#2a9d8f"; ctx.setLineDash([4, 4]); ctx.lineWidth = 1.5;
            ctx.beginPath(); ctx.moveTo(x, u.bbox.top); ctx.lineTo(x, u.bbox.top + u.bbox.height); ctx.stroke();
            ctx.fillStyle = "#2a9d8f"; ctx.fillText("best step " + s, x + 4, u.bbox.top + 12); ctx.restore();
          }],
        },
      };
      chart = new uPlot({
        width: Math.min(chartEl.clientWidth || 800, 900), height: 300, plugins: [bestLine],
        scales: { x: { time: false } },
        axes: [{ label: "step" }, { label: "loss" }],
        series: [{ label: "step" },
          { label: "train loss", stroke: "#e76f51", width: 2, spanGaps: true },
          { label: "validation loss", stroke: "#264653", width: 2, spanGaps: true, points: { show: true } },
          { label: "baseline (before training)", stroke: "#999", dash: [6, 4], width: 1 }],
      }, data, chartEl);
      window.tlChart = chart;
    }

    function onEvent(ev) {
      const li = document.createElement("li");
      li.className = ev.level;
      li.textContent = `${new Date(ev.created_at * 1000).toLocaleTimeString()}  ${ev.message}`;
      $("#events").append(li);
      const d = ev.data || {};
      if (d.baseline && d.valid_loss != null) baseline = d.valid_loss;
      else if (d.step != null && (d.train_loss != null || d.valid_loss != null)) {
        const m = steps.get(d.step) || {};
        if (d.train_loss != null) m.train = d.train_loss;
        if (d.valid_loss != null) m.valid = d.valid_loss;
        if (d.learning_rate != null) m.lr = d.learning_rate;
        steps.set(d.step, m);
      } else return;
      redraw();
    }

    function onJob(job) {
      const st = $("#status");
      st.textContent = job.status; st.className = "status " + job.status;
      const t = job.tunelab || {};
      $("#progress").textContent = t.total_steps ? `step ${t.step}/${t.total_steps}` : "";
      $("#ft-model").textContent = job.fine_tuned_model || "";
      $("#error").textContent = job.error ? job.error.message || JSON.stringify(job.error) : "";
      const finished = ["succeeded", "failed", "cancelled"].includes(job.status);
      for (const b of $$("button.act")) {
        const a = b.dataset.action;
        b.disabled = finished || (a === "resume" && job.status !== "paused") || (a === "pause" && job.status === "paused");
      }
      if (job.status !== "validating_files" && job.status !== "queued") $("#report").hidden = false;
      $("#register-card").hidden = job.status !== "succeeded";
      document.body.dataset.jobStatus = job.status;
    }

    for (const b of $$("button.act")) {
      b.addEventListener("click", async () => {
        try { onJob(await api(`/console/api/jobs/${id}/${b.dataset.action}`)); } catch (e) { flash(e.message); }
      });
    }
    $("#register")?.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      try {
        const v = await api(`/console/api/jobs/${id}/register`, { name: $("#reg-name").value });
        location.href = "/console/models?name=" + encodeURIComponent(v.name);
      } catch (e) { flash(e.message); }
    });
    const es = new EventSource(`/console/api/jobs/${id}/stream`);
    es.addEventListener("job-event", (m) => onEvent(JSON.parse(m.data)));
    es.addEventListener("job", (m) => onJob(JSON.parse(m.data)));
    es.addEventListener("checkpoints", (m) => {
      const f = (v) => (v == null ? "" : v.toFixed(4));
      $("#checkpoints tbody").replaceChildren(...JSON.parse(m.data).map((c) => {
        const tr = document.createElement("tr");
        for (const v of [c.step_number, c.fine_tuned_model_checkpoint, f(c.metrics.train_loss), f(c.metrics.valid_loss)]) {
          const td = document.createElement("td"); td.textContent = v; tr.append(td);
        }
        return tr;
      }));
    });
    es.addEventListener("end", () => { es.close(); document.body.dataset.streamEnded = "1"; });
    redraw();
  }

  // ------------------------------------------------------------------ data
  function dataPage() {
    const form = $("#upload");
    if (!form) return;
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const out = $("#upload-error");
      out.hidden = true;
      try {
        const f = await api("/console/api/files", new FormData(form));
        location.href = "/console/data/" + f.id;
      } catch (e) { out.textContent = e.message; out.hidden = false; }
    });
  }

  // ------------------------------------------------------------------ models
  function modelsPage(name) {
    const act = async (action, body) => {
      try { await api("/console/api/models/" + action, { name, ...body }); location.reload(); } catch (e) { flash(e.message); }
    };
    for (const b of $$("button.promote")) b.addEventListener("click", () => act("promote", { version: Number(b.dataset.version) }));
    for (const b of $$("button.rollback")) b.addEventListener("click", () => act("rollback", { alias: b.dataset.alias }));
    for (const f of $$("form.set-alias")) f.addEventListener("submit", (ev) => {
      ev.preventDefault();
      act("alias", { alias: f.alias.value, version: Number(f.dataset.version) });
    });
    $("#split")?.addEventListener("submit", (ev) => {
      ev.preventDefault();
      act("split", { alias: ev.target.alias.value, split: ev.target.split.value });
    });
  }

  // ------------------------------------------------------------------ playground
  async function stream(body, out) {
    out.textContent = "";
    const r = await fetch("/console/api/chat", {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf }, body: JSON.stringify(body),
    });
    if (!r.ok) {
      const e = (await r.json().catch(() => ({}))).error || {};
      throw new Error((e.param ? e.param + ": " : "") + (e.message || r.statusText));
    }
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const chunk = buf.slice(0, i); buf = buf.slice(i + 2);
        for (const line of chunk.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const msg = JSON.parse(line.slice(6));
          if (msg.error) throw new Error(msg.error.message);
          out.textContent += msg.choices?.[0]?.delta?.content || "";
        }
      }
    }
  }

  function playgroundPage() {
    const form = $("#play");
    let pair = null;
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const f = Object.fromEntries(new FormData(form));
      const blind = $("#blind").checked;
      const settings = { temperature: Number(f.temperature), top_p: Number(f.top_p), max_tokens: Number(f.max_tokens) };
      if (f.seed !== "") settings.seed = Number(f.seed);
      const shown = Object.entries(settings).map(([k, v]) => `${k}=${v}`).join(" · ");
      const common = { prompt: f.prompt, system: f.system || null, ...settings };
      $("#rate").hidden = true; $("#vote-result").textContent = "";
      document.body.dataset.played = "";
      try {
        let left, right;
        if (blind) {
          pair = (await api("/console/api/pairs", { x: f.left, y: f.right, prompt: f.prompt })).pair;
          $("#left-name").textContent = "A"; $("#right-name").textContent = "B";
          left = { ...common, pair, side: "A" }; right = { ...common, pair, side: "B" };
        } else {
          pair = null;
          $("#left-name").textContent = f.left; $("#right-name").textContent = f.right;
          left = { ...common, model: f.left }; right = { ...common, model: f.right };
        }
        $("#left-settings").textContent = shown; $("#right-settings").textContent = shown;
        await Promise.all([stream(left, $("#left-out")), stream(right, $("#right-out"))]);
        document.body.dataset.played = "1";
        if (blind) $("#rate").hidden = false;
      } catch (e) { flash(e.message); }
    });
    for (const b of $$("button.vote")) {
      b.addEventListener("click", async () => {
        try {
          const r = await api("/console/api/votes", { pair, verdict: b.dataset.verdict });
          $("#left-name").textContent = "A: " + r.a; $("#right-name").textContent = "B: " + r.b;
          const s = r.summary;
          $("#vote-result").textContent = `recorded (${r.recorded.outcome} for ${r.recorded.x}); ${s.n} vote(s) for ` +
            `${s.x} vs ${s.y}: win rate ${(100 * s.win_rate).toFixed(0)}% (${s.wins} wins, ${s.ties} ties, ${s.losses} losses)`;
          $("#rate").hidden = false; pair = null;
          for (const v of $$("button.vote")) v.disabled = true;
        } catch (e) { flash(e.message); }
      });
    }
    $("#send").addEventListener("click", () => { for (const v of $$("button.vote")) v.disabled = false; });
  }

  return { api, flash, jobsPage, jobPage, dataPage, modelsPage, playgroundPage };
})();
