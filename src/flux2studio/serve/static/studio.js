// Flux2 Studio page: talks to the same server's /v1 API. No build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const ASPECTS = ["1:1", "4:3", "3:4", "3:2", "2:3", "16:9", "9:16", "21:9", "9:21"];
const state = { models: [], aspect: "1:1", size: null, refs: [], edit: null };  // edit: { id, expand: [l, t, r, b] }
// size: [w, h] of a gallery job whose settings were taken (its exact size), until an aspect is chosen

function headers(json = true) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const token = $("token").value || localStorage.getItem("flux2-token") || "";
  if (token) h.Authorization = `Bearer ${token}`;
  return h;
}

async function api(path, options = {}) {
  const r = await fetch(path, { ...options, headers: { ...headers(!(options.body instanceof FormData)), ...(options.headers || {}) } });
  if (!r.ok) throw new Error(await failure(r));
  return r.json();
}

// Every error the server sends carries OpenAI's `error.message` (a validation error's `detail` is a list).
async function failure(r) {
  let detail = r.statusText;
  try {
    const body = await r.json();
    detail = body.error?.message || (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail));
  } catch (e) { /* not JSON */ }
  return `${r.status}: ${detail}`;
}

async function fetchImage(path) {
  const r = await fetch(path, { headers: headers(false) });
  if (!r.ok) throw new Error(await failure(r));
  return URL.createObjectURL(await r.blob());
}

function model() { return state.models.find((m) => m.id === $("model").value); }

function showModel() {
  const m = model();
  if (!m) return;
  if (state.size) { state.size = null; renderAspects(); }  // a gallery job's size: not another model's
  const defaults = [m.steps != null ? `${m.steps} steps` : null,
                    m.guidance_mode !== "none" ? `guidance ${m.guidance} (${m.guidance_mode})` : null,
                    m.default_size.join("x")].filter(Boolean).join(", ");
  const hosted = m.hosted ? ` Hosted (Black Forest Labs API)${m.usd_per_image != null ? `, about $${m.usd_per_image} per 1 MP image` : ""}.` : "";
  $("model-info").textContent = `${m.description} Defaults: ${defaults}.${hosted}`;
  $("steps").value = m.steps ?? "";
  $("steps-row").hidden = m.steps == null;
  $("guidance").value = m.guidance;
  $("guidance-row").hidden = m.guidance_mode === "none";
  $("negative-row").hidden = m.guidance_mode !== "cfg";
  $("upsampling-row").hidden = m.prompt_upsampling == null;
  $("upsampling").checked = Boolean(m.prompt_upsampling);
  $("interval-row").hidden = !m.guidance_interval;
  // hidden inputs must not be checked by the form: required and empty, they blocked "Generate" without a word
  $("interval-lo").disabled = $("interval-hi").disabled = !m.guidance_interval;
  if (m.guidance_interval) showInterval(m.guidance_interval);
}

function showInterval([lo, hi]) {
  $("interval-lo").value = lo;
  $("interval-hi").value = hi;
}

function renderAspects() {
  $("aspects").innerHTML = "";
  for (const a of [...(state.size ? [state.size.join("x")] : []), ...ASPECTS]) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = a;
    b.className = (state.size ? a === state.size.join("x") : a === state.aspect) ? "active" : "";
    b.onclick = () => {
      if (ASPECTS.includes(a)) { state.aspect = a; state.size = null; }
      renderAspects();
    };
    $("aspects").appendChild(b);
  }
}

async function upload(blob, name) {
  // one image to /v1/uploads; its id names it in a job
  const form = new FormData();
  form.append("file", blob, name);
  return (await api("/v1/uploads", { method: "POST", body: form })).id;
}

async function addRefs(files) {
  for (const file of files) {
    try {
      const id = await upload(file, file.name);
      state.refs.push(id);
      const img = document.createElement("img");
      img.src = URL.createObjectURL(file);
      img.title = "click to remove";
      img.onclick = () => { state.refs = state.refs.filter((r) => r !== id); img.remove(); };
      $("refs").appendChild(img);
    } catch (e) { $("status").textContent = `Upload refused: ${e.message}`; }
  }
}

// ---- editing: a start image, a painted mask (opaque pixels of #mask-canvas = repaint), strength, outpainting
async function setEditImage(file) {
  if (!file) return;
  let id;
  try { id = await upload(file, file.name); }
  catch (e) { $("status").textContent = `Upload refused: ${e.message}`; return; }
  const bitmap = await createImageBitmap(file);
  for (const c of [$("edit-image"), $("mask-canvas")]) { c.width = bitmap.width; c.height = bitmap.height; }
  $("edit-image").getContext("2d").drawImage(bitmap, 0, 0);
  // maskId: the painted mask as last uploaded (null: not uploaded since the last change)
  state.edit = { id, expand: [0, 0, 0, 0], strengthSet: false, maskId: null };
  $("strength").value = 0.75; $("strength-value").textContent = "0.75";
  $("edit-tools").hidden = false;
  $("aspects").closest("fieldset").hidden = true;  // the image sets the size
  showExpand();
}

function removeEditImage() {
  state.edit = null;
  $("edit-tools").hidden = true;
  $("aspects").closest("fieldset").hidden = false;
  $("edit-input").value = "";
}

function maskPainted() {
  const c = $("mask-canvas");
  const data = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  for (let i = 3; i < data.length; i += 4) if (data[i] > 0) return true;
  return false;
}

function syncStrength() {
  // unless the slider was moved: a mask or an expansion repaints its area from noise (1), a whole image 0.75
  if (!state.edit || state.edit.strengthSet) return;
  const value = maskPainted() || state.edit.expand.some((v) => v) ? "1" : "0.75";
  $("strength").value = value;
  $("strength-value").textContent = value;
}

function paintAt(event) {
  state.edit.maskId = null;
  const c = $("mask-canvas");
  const box = c.getBoundingClientRect();
  const scale = c.width / box.width;
  const ctx = c.getContext("2d");
  ctx.globalCompositeOperation = $("eraser").checked ? "destination-out" : "source-over";
  ctx.fillStyle = "#f33";
  ctx.beginPath();
  ctx.arc((event.clientX - box.left) * scale, (event.clientY - box.top) * scale,
          Number($("brush").value) / 2, 0, 2 * Math.PI);  // brush size in the image's own pixels
  ctx.fill();
}

function invertMask() {
  const c = $("mask-canvas");
  const ctx = c.getContext("2d");
  const image = ctx.getImageData(0, 0, c.width, c.height);
  for (let i = 0; i < image.data.length; i += 4) {
    const painted = image.data[i + 3] > 0;
    image.data.set(painted ? [0, 0, 0, 0] : [255, 51, 51, 255], i);
  }
  ctx.putImageData(image, 0, 0);
}

async function uploadMask() {
  // white where painted, black elsewhere, at the image's own size (the server's convention: white = repaint)
  const c = $("mask-canvas");
  const out = document.createElement("canvas");
  out.width = c.width; out.height = c.height;
  const image = c.getContext("2d").getImageData(0, 0, c.width, c.height);
  for (let i = 0; i < image.data.length; i += 4) {
    const v = image.data[i + 3] > 0 ? 255 : 0;
    image.data.set([v, v, v, 255], i);
  }
  out.getContext("2d").putImageData(image, 0, 0);
  const blob = await new Promise((resolve) => out.toBlob(resolve, "image/png"));
  return upload(blob, "mask.png");
}

function showExpand() {
  const e = state.edit.expand;
  $("expand-info").textContent = e.some((v) => v) ? `left ${e[0]}, top ${e[1]}, right ${e[2]}, bottom ${e[3]} px` : "no expansion";
}

async function editFields() {
  if (!state.edit) return {};
  const fields = { image: state.edit.id, strength: Number($("strength").value) };
  if (maskPainted()) fields.mask = state.edit.maskId ??= await uploadMask();  // once per painted mask
  if (state.edit.expand.some((v) => v)) fields.expand = state.edit.expand;
  return fields;
}

function settings() {
  const m = model();
  const body = { model: m.id, prompt: $("prompt").value, seed: Number($("seed").value),
                 num_images: Number($("num").value), refs: state.refs };
  if (!state.edit && state.size) [body.width, body.height] = state.size;  // a gallery job's exact size
  else if (!state.edit) body.aspect = state.aspect;
  if (m.steps != null) body.steps = Number($("steps").value);
  if (m.guidance_mode !== "none") body.guidance = Number($("guidance").value);
  if (m.guidance_mode === "cfg" && $("negative").value) body.negative_prompt = $("negative").value;
  if (m.guidance_interval) body.guidance_interval = [Number($("interval-lo").value), Number($("interval-hi").value)];
  if (m.prompt_upsampling != null) body.prompt_upsampling = $("upsampling").checked;
  return body;
}

function follow(job, onProgress, onLost = (text) => { $("status").textContent = text; }) {
  return new Promise((resolve, reject) => {
    // Server-Sent Events need the token in a header, which EventSource cannot send: poll instead then.
    // A lost connection (a server restarting) is waited out: the job is kept and runs after it.
    let wait = 150, lostSince = null;
    const poll = async () => {
      try {
        const j = await api(`/v1/jobs/${job.id}`);
        wait = 150; lostSince = null;
        onProgress(j);
        if (["done", "failed", "cancelled"].includes(j.status)) return resolve(j);
      } catch (e) {
        if (!(e instanceof TypeError)) return reject(e);  // an answer (404, 401...), not a lost connection
        lostSince ??= Date.now();
        if (Date.now() - lostSince > 600000) return reject(new Error("the server has not answered for 10 minutes"));
        wait = Math.min(wait * 2, 5000);
        onLost("Connection lost: waiting for the server…");
      }
      setTimeout(poll, wait);
    };
    poll();
  });
}

async function showPreview(id) {
  // the running step's estimate of the final image; 204 until the worker has one
  const r = await fetch(`/v1/jobs/${id}/preview`, { headers: headers(false) });
  if (r.status !== 200 || $("generate").disabled === false) return;
  const old = $("preview").src;
  $("preview").src = URL.createObjectURL(await r.blob());
  if (old) URL.revokeObjectURL(old);
  $("preview").hidden = false;
  $("preview").dataset.count = Number($("preview").dataset.count) + 1;
}

async function generate(event) {
  if (event) event.preventDefault();
  if (!$("prompt").value.trim()) { $("status").textContent = "Write a prompt first."; return; }
  $("generate").disabled = true;
  $("status").textContent = "Queued…";
  try {
    const job = await api("/v1/jobs", { method: "POST", body: JSON.stringify({ ...settings(), ...(await editFields()) }) });
    let shownStep = -1;
    const done = await follow(job, (j) => {
      $("progress").max = j.progress.steps || 1;
      $("progress").value = j.progress.step;
      $("status").textContent = j.status === "running" ? `Step ${j.progress.step} / ${j.progress.steps}` : j.status;
      if (j.status === "running" && j.progress.step !== shownStep) { shownStep = j.progress.step; showPreview(job.id); }
    });
    $("preview").hidden = true;
    if (done.status !== "done") throw new Error(done.error || done.status);
    $("status").textContent = `Done: seed ${done.settings.seed}, ${done.settings.width}x${done.settings.height}`;
    $("result").innerHTML = "";
    for (const path of done.images) {
      const img = document.createElement("img");
      img.src = await fetchImage(path);
      img.alt = done.settings.prompt;
      $("result").appendChild(img);
    }
    if (!$("seed-lock").checked) $("seed").value = Math.floor(Math.random() * 2 ** 31);
    await refreshGallery();
  } catch (e) {
    $("status").textContent = `Error: ${e.message}`;
  } finally {
    $("generate").disabled = false;
  }
}

function useSettings(job) {
  const s = job.settings;
  $("model").value = job.model; showModel();
  $("prompt").value = s.prompt;
  $("negative").value = s.negative_prompt || "";
  $("steps").value = s.steps;
  $("guidance").value = s.guidance;
  if (s.guidance_interval) showInterval(s.guidance_interval);
  if (s.prompt_upsampling != null) $("upsampling").checked = s.prompt_upsampling;
  $("seed").value = s.seed;
  $("seed-lock").checked = true;
  $("num").value = s.num_images;
  state.size = [s.width, s.height];  // its exact size (an aspect would make another image)
  renderAspects();
  $("status").textContent = `Settings of job ${job.id.slice(0, 8)} loaded.`;
  window.scrollTo(0, 0);
}

async function card(job) {
  const div = document.createElement("div");
  div.className = "card";
  const img = document.createElement("img");
  img.src = await fetchImage(job.images[0]);
  img.alt = job.settings.prompt;
  const link = document.createElement("a");
  link.href = img.src; link.download = `${job.model}-${job.settings.seed}.png`; link.textContent = "download";
  const use = document.createElement("button");
  use.textContent = "use these settings"; use.className = "use"; use.onclick = () => useSettings(job);
  const text = document.createElement("p");
  text.textContent = `${job.model} · seed ${job.settings.seed} · ${job.settings.steps} steps · ${job.settings.width}x${job.settings.height} — ${job.settings.prompt}`;
  div.append(img, text, use, document.createTextNode(" "), link);
  return div;
}

async function refreshGallery() {
  const { data } = await api("/v1/jobs?status=done&limit=24");
  // a job whose image is gone (deleted meanwhile) drops out; the others still show
  const cards = await Promise.all(data.filter((j) => j.images.length).map((j) => card(j).catch(() => null)));
  $("gallery").replaceChildren(...cards.filter(Boolean));
}

async function compare() {
  const prompt = $("cmp-prompt").value;
  const chosen = [...document.querySelectorAll("#cmp-models input:checked")].map((c) => c.value);
  $("cmp-grid").innerHTML = "";
  const jobs = await Promise.all(chosen.map((id) => api("/v1/jobs", { method: "POST", body: JSON.stringify({
    model: id, prompt, seed: Number($("cmp-seed").value) }) })));
  for (const job of jobs) {
    const done = await follow(job, () => {}, () => {});
    if (done.status === "done") $("cmp-grid").appendChild(await card(done));
  }
}

async function init() {
  $("token").value = localStorage.getItem("flux2-token") || "";
  $("token").onchange = () => { localStorage.setItem("flux2-token", $("token").value); init(); };
  for (const tab of document.querySelectorAll(".tab")) {
    tab.onclick = () => {
      document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t === tab));
      document.querySelectorAll(".view").forEach((v) => { v.hidden = v.id !== `view-${tab.dataset.view}`; });
    };
  }
  try {
    state.models = (await api("/v1/models")).data;
  } catch (e) { $("status").textContent = `Cannot list models: ${e.message}`; return; }
  if ($("status").textContent.startsWith("Cannot list models")) $("status").textContent = "";  // (a token came)
  $("model").innerHTML = state.models.map((m) =>
    `<option value="${m.id}">${m.id}${m.hosted ? ` (hosted${m.usd_per_image != null ? ` · $${m.usd_per_image}` : ""})` : ""}</option>`).join("");
  $("model").onchange = showModel;
  $("cmp-models").innerHTML = state.models.map((m) =>
    `<label class="inline"><input type="checkbox" value="${m.id}" checked> ${m.id}${m.hosted ? " (hosted)" : ""}</label>`).join("");
  showModel();
  renderAspects();
  $("form").onsubmit = generate;
  $("cmp-run").onclick = compare;
  const drop = $("drop");
  drop.onclick = () => $("ref-input").click();
  $("ref-input").onchange = (e) => addRefs(e.target.files);
  drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
  drop.ondragleave = () => drop.classList.remove("over");
  drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove("over"); addRefs(e.dataTransfer.files); };
  document.addEventListener("keydown", (e) => { if (e.ctrlKey && e.key === "Enter") generate(e); });
  const editDrop = $("edit-drop");
  editDrop.onclick = () => $("edit-input").click();
  $("edit-input").onchange = (e) => setEditImage(e.target.files[0]);
  editDrop.ondragover = (e) => { e.preventDefault(); editDrop.classList.add("over"); };
  editDrop.ondragleave = () => editDrop.classList.remove("over");
  editDrop.ondrop = (e) => { e.preventDefault(); editDrop.classList.remove("over"); setEditImage(e.dataTransfer.files[0]); };
  const mask = $("mask-canvas");
  mask.onpointerdown = (e) => { mask.setPointerCapture(e.pointerId); paintAt(e); };
  mask.onpointermove = (e) => { if (e.buttons & 1) paintAt(e); };
  mask.onpointerup = syncStrength;
  $("mask-clear").onclick = () => {
    mask.getContext("2d").clearRect(0, 0, mask.width, mask.height);
    state.edit.maskId = null;
    syncStrength();
  };
  $("mask-invert").onclick = () => { invertMask(); state.edit.maskId = null; syncStrength(); };
  $("edit-remove").onclick = removeEditImage;
  $("strength").oninput = () => {
    $("strength-value").textContent = $("strength").value;
    if (state.edit) state.edit.strengthSet = true;
  };
  for (const b of document.querySelectorAll("#outpaint [data-side]")) {
    b.onclick = () => { state.edit.expand[Number(b.dataset.side)] += 64; syncStrength(); showExpand(); };
  }
  $("expand-reset").onclick = () => { state.edit.expand = [0, 0, 0, 0]; syncStrength(); showExpand(); };
  await refreshGallery();
}

init();
