// The search page: a reference image (uploaded or picked from the catalog) plus a modification text go to
// POST /search as multipart; results come back as a grid; clicking one makes it the next reference.
// A service with an API key answers 401: the page then asks for the key, keeps it for this tab only
// (sessionStorage) and sends it as a bearer token, images included (fetched, then shown from blob: URLs,
// since an <img src> cannot carry the header).
"use strict";

const $ = (id) => document.getElementById(id);
const PAGE_SIZE = 24;
const KEY = "cirflow-api-key";
const state = { file: null, referenceId: null, offset: 0, total: 0, busy: false };

class AuthError extends Error {}

function authorized(options) {
  const key = sessionStorage.getItem(KEY);
  if (!key) return options || {};
  const headers = new Headers((options && options.headers) || {});
  headers.set("Authorization", `Bearer ${key}`);
  return { ...(options || {}), headers };
}

async function getJSON(url, options) {
  const response = await fetch(url, authorized(options));
  let body = null;
  try { body = await response.json(); } catch (e) { /* a non-JSON error page */ }
  if (!response.ok) {
    const detail = body && body.detail ? body.detail : `${response.status} ${response.statusText}`;
    const message = typeof detail === "string" ? detail : JSON.stringify(detail);
    if (response.status === 401) {
      askForKey();
      throw new AuthError(message);
    }
    throw new Error(message);
  }
  return body;
}

function showImage(img, url) {
  if (!sessionStorage.getItem(KEY)) {
    img.src = url;
    return;
  }
  fetch(url, authorized()).then((r) => (r.ok ? r.blob() : Promise.reject(new Error(r.statusText))))
    .then((blob) => { img.src = URL.createObjectURL(blob); })
    .catch(() => { img.alt = `${img.alt} (not available)`; });
}

function askForKey() {
  sessionStorage.removeItem(KEY);
  $("key-form").hidden = false;
  $("key").focus();
}

function useKey(event) {
  event.preventDefault();
  const key = $("key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY, key);
  $("key").value = "";
  $("key-form").hidden = true;
  showError("");
  loadInfo();
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

async function loadInfo() {
  try {
    const info = await getJSON("/api/info");
    $("served").textContent = `catalog ${info.catalog} · ${info.vectors.toLocaleString()} items · ` +
      `index ${info.index_id} · model ${info.bundle_id}`;
    const fields = Object.keys(info.metadata_fields || {});
    if (fields.length) {
      $("filter-field").replaceChildren(new Option("(none)", ""), ...fields.map((f) => new Option(f, f)));
      $("filter-row").hidden = false;
    }
  } catch (e) {
    $("served").textContent = "";
    showError(e instanceof AuthError ? e.message : `The service is not ready: ${e.message}`);
  }
}

async function loadCatalog(offset) {
  try {
    const page = await getJSON(`/items?offset=${offset}&limit=${PAGE_SIZE}`);
    state.offset = page.offset;
    state.total = page.total;
    $("catalog").replaceChildren(...page.items.map((item) => {
      const img = new Image();
      img.alt = `catalog item ${item.id}`;
      showImage(img, item.image);
      img.title = item.id;
      img.loading = "lazy";
      img.addEventListener("click", () => useCatalogItem(item.id, item.image));
      return img;
    }));
    const last = Math.min(state.offset + PAGE_SIZE, state.total);
    $("page-note").textContent = state.total ? `${state.offset + 1}–${last} of ${state.total}` : "empty catalog";
    $("prev-page").disabled = state.offset === 0;
    $("next-page").disabled = last >= state.total;
  } catch (e) {
    showError(`Cannot list the catalog: ${e.message}`);
  }
}

function setPreview(src, note) {
  if (src.startsWith("blob:") || !src) $("preview").src = src; else showImage($("preview"), src);
  $("preview").hidden = !src;
  $("drop-hint").hidden = Boolean(src);
  $("reference-note").textContent = note || "";
  $("clear-reference").hidden = !src;
}

function useFile(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    showError(`${file.name} is not an image (${file.type || "unknown type"})`);
    return;
  }
  state.file = file;
  state.referenceId = null;
  setPreview(URL.createObjectURL(file), `uploaded: ${file.name}`);
  showError("");
}

function useCatalogItem(id, image) {
  state.file = null;
  state.referenceId = id;
  setPreview(image, `catalog item ${id}`);
  showError("");
  $("text").value = "";
  $("text").focus();
}

function clearReference() {
  state.file = null;
  state.referenceId = null;
  $("file").value = "";
  setPreview("", "");
}

async function search(event) {
  if (event) event.preventDefault();
  if (state.busy) return;
  const text = $("text").value.trim();
  if (!text && !state.file && !state.referenceId) {
    showError("Give a reference image, a modification text, or both.");
    return;
  }
  const form = new FormData();
  if (state.file) form.append("image", state.file);
  if (state.referenceId) form.append("reference_id", state.referenceId);
  if (text) form.append("text", text);
  form.append("k", $("k").value);
  const field = $("filter-field").value;
  const value = $("filter-value").value.trim();
  if (field && value) {
    const values = value.split(",").map((v) => v.trim()).filter(Boolean);
    form.append("filter", JSON.stringify({ [field]: values }));
  }
  state.busy = true;
  $("go").disabled = true;
  $("status").textContent = "searching…";
  try {
    const answer = await getJSON("/search", { method: "POST", body: form });
    showError("");
    render(answer);
  } catch (e) {
    $("status").textContent = "";
    showError(e.message);
  } finally {
    state.busy = false;
    $("go").disabled = false;
  }
}

function render(answer) {
  $("status").textContent = `${answer.results.length} results · ${answer.mode} · ` +
    `${answer.took_ms.total.toFixed(1)} ms · index ${answer.index_id}`;
  $("status").title = answer.answers;
  $("results").replaceChildren(...answer.results.map((hit, i) => {
    const card = document.createElement("button");
    card.type = "button";
    card.className = "hit";
    card.dataset.id = hit.id;
    card.title = `${hit.uri}\nclick to use it as the next reference`;
    const img = new Image();
    img.alt = `result ${i + 1}: item ${hit.id}`;
    showImage(img, hit.image);
    const meta = document.createElement("div");
    meta.className = "meta";
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = `#${i + 1}`;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    meta.append(rank, score);
    const use = document.createElement("span");
    use.className = "use";
    use.textContent = "use as reference";
    card.append(img, meta, use);
    card.addEventListener("click", () => useCatalogItem(hit.id, hit.image));
    return card;
  }));
}

function wire() {
  $("file").addEventListener("change", (e) => useFile(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    useFile(e.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
  $("clear-reference").addEventListener("click", clearReference);
  $("search-form").addEventListener("submit", search);
  $("key-form").addEventListener("submit", useKey);
  $("prev-page").addEventListener("click", () => loadCatalog(Math.max(0, state.offset - PAGE_SIZE)));
  $("next-page").addEventListener("click", () => loadCatalog(state.offset + PAGE_SIZE));
  $("browse").addEventListener("toggle", () => { if ($("browse").open && !$("catalog").children.length) loadCatalog(0); });
}

wire();
loadInfo();
