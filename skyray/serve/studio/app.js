// skyray studio: plain JavaScript, no build step, nothing fetched from elsewhere.
// The token lives in sessionStorage (this tab only) and travels only in Authorization headers; <video> and
// <img> get short-lived signed URLs from POST /v1/jobs/{id}/media instead.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { job: null, abort: null, shots: new Set(), validated: null, timer: null };

function token() { return sessionStorage.getItem("skyray-token") || ""; }

async function api(path, opts = {}) {
  const headers = Object.assign({ Authorization: "Bearer " + token() }, opts.headers || {});
  const r = await fetch(path, Object.assign({}, opts, { headers }));
  const type = r.headers.get("content-type") || "";
  const body = type.includes("json") ? await r.json() : null;
  if (!r.ok) {
    const detail = body && (body.detail || (body.error && body.error.message));
    throw new Error(`${r.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail) || r.statusText}`);
  }
  return body;
}

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

function say(where, text, error = false) {
  where.textContent = text;
  where.classList.toggle("error", error);
}

// ------------------------------------------------------------------------------------------------ storyboard

async function validate() {
  const text = $("storyboard").value;
  state.validated = null;
  $("submit").disabled = true;
  $("issues").replaceChildren();
  $("plan").replaceChildren();
  if (!text.trim()) return;
  let res;
  try {
    res = await api("/v1/plan", { method: "POST", headers: { "Content-Type": "application/x-yaml" }, body: text });
  } catch (err) {
    $("issues").append(el("li", { textContent: err.message }));
    return;
  }
  if (!res.ok) {
    for (const issue of res.issues) {
      const li = el("li", { textContent: issue.line ? `line ${issue.line}: ${issue.message}` : issue.message });
      if (issue.line) li.onclick = () => selectLine(issue.line);
      $("issues").append(li);
    }
    return;
  }
  state.validated = text;
  $("submit").disabled = false;
  showPlan(res.plan);
}

function selectLine(n) {
  const area = $("storyboard");
  const lines = area.value.split("\n");
  const start = lines.slice(0, n - 1).join("\n").length + (n > 1 ? 1 : 0);
  area.focus();
  area.setSelectionRange(start, start + (lines[n - 1] || "").length);
}

const gpu = (x) => (x >= 100 ? Math.round(x).toString() : Number(x).toPrecision(3));

function showPlan(p) {
  const rows = p.shots.map((s) => el("tr", {},
    el("td", { textContent: s.id }), el("td", { textContent: s.frames }), el("td", { textContent: s.seconds }),
    el("td", { textContent: s.windows }), el("td", { textContent: gpu(s.gpu_seconds) }),
    el("td", { textContent: s.continues ? `continues ${s.continues}` : "cut" })));
  const head = el("tr", {}, ...["shot", "frames", "seconds", "windows", "GPU-s", ""].map((t) => el("th", { textContent: t })));
  const total = el("tr", {}, el("th", { textContent: "total" }), el("th", { textContent: p.frames }),
    el("th", { textContent: p.seconds }), el("th", { textContent: p.windows }), el("th", { textContent: gpu(p.gpu_seconds) }),
    el("th", { textContent: "" }));
  $("plan").replaceChildren(
    el("p", { id: "plan-summary", textContent: `${p.title}: ${p.width}x${p.height} @ ${p.fps} fps on ${p.model}: ` +
      `${p.shots.length} shots, ${p.windows} windows, about ${gpu(p.gpu_seconds)} GPU-seconds` }),
    el("table", {}, head, ...rows, total),
    ...p.warnings.map((w) => el("p", { className: "error", textContent: w })));
}

async function submit() {
  if (state.validated === null) return;
  $("submit").disabled = true;
  try {
    const job = await api("/v1/films", { method: "POST", headers: { "Content-Type": "application/x-yaml" },
                                         body: state.validated });
    refreshJobs();
    follow(job.id);
  } catch (err) {
    $("issues").append(el("li", { textContent: err.message }));
  } finally {
    $("submit").disabled = state.validated === null;
  }
}

// ------------------------------------------------------------------------------------------------- progress

function setProgress(done, total) {
  const f = total ? done / total : 0;
  $("bar").value = f;
  $("percent").textContent = `${Math.round(f * 100)}%`;
}

async function follow(id) {
  if (state.abort) state.abort.abort();
  const ctl = new AbortController();
  Object.assign(state, { abort: ctl, job: id, shots: new Set() });
  $("job-id").textContent = id.slice(0, 8);
  for (const k of ["previews", "clips"]) $(k).replaceChildren();
  $("film").hidden = $("sheet").hidden = true;
  $("film").removeAttribute("src");
  setProgress(0, 1);
  say($("status"), "");
  try {
    // A streaming fetch, not EventSource: it can send the Authorization header.
    const r = await fetch(`/v1/jobs/${id}/events`, { headers: { Authorization: "Bearer " + token() }, signal: ctl.signal });
    if (!r.ok) throw new Error(`${r.status} ${r.statusText}`);
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const chunk = buf.slice(0, i);
        buf = buf.slice(i + 2);
        await onEvent(parse(chunk));
      }
    }
    const job = await api(`/v1/jobs/${id}`);
    say($("status"), job.status + (job.error ? `: ${job.error}` : ""), job.status === "failed");
    if (job.status === "done") await showFilm(id);
  } catch (err) {
    if (err.name !== "AbortError") say($("status"), err.message, true);
  }
  refreshJobs();
}

function parse(chunk) {
  let type = "message", data = "";
  for (const line of chunk.split("\n")) {
    if (line.startsWith("event:")) type = line.slice(6).trim();
    else if (line.startsWith("data:")) data += line.slice(5).trim();
  }
  return { type, data: data ? JSON.parse(data) : null };
}

async function onEvent({ type, data }) {
  if (!data || data.job !== state.job) return;
  if (data.windows_total) setProgress(data.windows_done, data.windows_total);
  if (type === "status") {
    say($("status"), data.status);
    if (data.status === "done") setProgress(1, 1);
  } else if (type === "window" && data.preview) {
    const img = el("img", { src: `data:image/jpeg;base64,${data.preview.base64}`, alt: `${data.shot} window ${data.window}` });
    $("previews").append(el("figure", {}, img, el("figcaption", { textContent: `${data.shot} ${data.window + 1}/${data.windows}` })));
    while ($("previews").children.length > 12) $("previews").firstChild.remove();
  } else if (type === "shot_done") {
    await showShots();  // the finished part plays while the rest renders
  }
}

async function showShots() {
  const media = await api(`/v1/jobs/${state.job}/media`, { method: "POST" });
  for (const [shot, url] of Object.entries(media.shots)) {
    if (state.shots.has(shot)) continue;
    state.shots.add(shot);
    const video = el("video", { src: url, controls: true, muted: true, autoplay: true, loop: true, playsInline: true });
    video.dataset.shot = shot;
    $("clips").append(el("figure", {}, video, el("figcaption", { textContent: shot })));
  }
  return media;
}

async function showFilm(id) {
  const media = await showShots();
  if (state.job !== id) return;
  if (media.video) {
    $("film").src = media.video;
    $("film").hidden = false;
  }
  if (media.contact_sheet) {
    $("sheet").src = media.contact_sheet;
    $("sheet").hidden = false;
  }
}

// ------------------------------------------------------------------------------------------------------ jobs

async function refreshJobs() {
  if (!token()) return;
  let list;
  try {
    list = await api("/v1/jobs");
  } catch (err) {
    say($("token-state"), err.message, true);
    return;
  }
  const rows = list.jobs.map((j) => {
    const tr = el("tr", {}, el("td", { textContent: j.id.slice(0, 8) }), el("td", { textContent: j.kind }),
      el("td", { textContent: j.status }), el("td", { textContent: `${Math.round(j.progress.fraction * 100)}%` }));
    tr.dataset.job = j.id;
    tr.onclick = () => follow(j.id);
    return tr;
  });
  $("jobs").tBodies[0].replaceChildren(...rows);
}

// ----------------------------------------------------------------------------------------------------- setup

async function loadDemo() {
  const r = await fetch("/studio/demo.yaml");
  $("storyboard").value = await r.text();
  validate();
}

$("token-form").onsubmit = (e) => {
  e.preventDefault();
  sessionStorage.setItem("skyray-token", $("token").value.trim());
  $("token").value = "";
  say($("token-state"), "token kept for this tab");
  refreshJobs();
  validate();
};
$("file").onchange = async () => {
  const f = $("file").files[0];
  if (f) { $("storyboard").value = await f.text(); validate(); }
};
$("storyboard").oninput = () => { clearTimeout(state.timer); state.timer = setTimeout(validate, 400); };
$("demo").onclick = loadDemo;
$("validate").onclick = validate;
$("submit").onclick = submit;
$("refresh").onclick = refreshJobs;
if (token()) say($("token-state"), "token kept for this tab");
loadDemo();
refreshJobs();
