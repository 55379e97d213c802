"use strict";
// The vlembed playground: talks to the server that served it (same origin),
// never to any other address. The API key lives in this page's memory only.
(function () {
  const $ = (id) => document.getElementById(id);
  const state = { query: null, candidates: [], models: [] };
  let nextId = 0;

  function headers(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    const key = $("api-key").value.trim();
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  function setError(msg) { $("error").textContent = msg || ""; }

  async function errorText(res) {
    const text = await res.text();
    try {
      const e = JSON.parse(text).error;
      if (e && e.message) return { message: e.message, type: e.type, id: e.request_id };
    } catch (_) { /* not JSON */ }
    return { message: res.status + " " + (text || res.statusText) };
  }

  async function loadInfo() {
    let res;
    try { res = await fetch("/info", { headers: headers(false) }); }
    catch (e) { setError("cannot reach the server: " + e); return; }
    if (res.status === 401) {
      setError("This server needs an API key: enter it above (the model list loads once it is accepted).");
      return;
    }
    if (!res.ok) { setError("/info: " + (await errorText(res)).message); return; }
    setError("");
    const info = await res.json();
    state.models = info.models;
    $("server-info").textContent = "vlembed " + info.version + (info.auth ? " · API key required" : "");
    const sel = $("model");
    const keep = sel.value;
    sel.textContent = "";
    for (const m of info.models) {
      const o = document.createElement("option");
      o.value = m.name;
      o.textContent = m.name + (m.status === "ready" ? "" : " (" + m.status + ")");
      sel.appendChild(o);
    }
    if (keep && info.models.some((m) => m.name === keep)) sel.value = keep;
    showModel();
  }

  function showModel() {
    const m = state.models.find((x) => x.name === $("model").value);
    $("model-info").textContent = m
      ? [m.architecture, m.dimensions && m.dimensions + " dimensions", m.dtype,
         m.devices && m.devices.join(", "), m.uses_instructions ? "uses instructions" : ""]
          .filter(Boolean).join(" · ")
      : "";
  }

  function readFile(file) {
    return new Promise((resolve, reject) => {
      const r = new FileReader();
      r.onload = () => resolve(r.result);
      r.onerror = () => reject(r.error);
      r.readAsDataURL(file);
    });
  }

  async function toImage(file) {
    const url = await readFile(file);
    return { id: nextId++, name: file.name || "image", dataUrl: url,
      base64: String(url).slice(String(url).indexOf(",") + 1), error: "" };
  }

  function thumb(img, onRemove) {
    const d = document.createElement("div");
    d.className = "thumb" + (img.error ? " bad" : "");
    d.dataset.id = img.id;
    const i = document.createElement("img");
    i.src = img.dataUrl; i.alt = img.name;
    const b = document.createElement("button");
    b.type = "button"; b.textContent = "×"; b.title = "remove " + img.name;
    b.onclick = onRemove;
    const n = document.createElement("div");
    n.textContent = img.name;
    d.append(i, b, n);
    if (img.error) {
      const e = document.createElement("div");
      e.className = "error"; e.textContent = img.error;
      d.appendChild(e);
    }
    return d;
  }

  function render() {
    const q = $("query-thumbs");
    q.textContent = "";
    if (state.query) q.appendChild(thumb(state.query, () => { state.query = null; render(); }));
    const c = $("cand-thumbs");
    c.textContent = "";
    state.candidates.forEach((img) => c.appendChild(thumb(img, () => {
      state.candidates = state.candidates.filter((x) => x !== img); render();
    })));
  }

  function dropZone(zone, input, multiple, take) {
    zone.onclick = () => input.click();
    zone.onkeydown = (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } };
    zone.ondragover = (e) => { e.preventDefault(); zone.classList.add("over"); };
    zone.ondragleave = () => zone.classList.remove("over");
    zone.ondrop = async (e) => {
      e.preventDefault(); zone.classList.remove("over");
      const files = Array.from(e.dataTransfer.files || []);
      await take(multiple ? files : files.slice(0, 1));
    };
    input.onchange = async () => { await take(Array.from(input.files || [])); input.value = ""; };
  }

  function candidateTexts() {
    return $("candidate-texts").value.split("\n").map((s) => s.trim()).filter(Boolean);
  }

  // Candidates in request order: images first, then texts.
  function candidateList() {
    return state.candidates.map((img) => ({ kind: "image", img }))
      .concat(candidateTexts().map((text) => ({ kind: "text", text })));
  }

  function queryInput() {
    const q = {};
    const text = $("query-text").value.trim();
    if (text) q.text = text;
    if (state.query) q.image = state.query.base64;
    const instr = $("instruction").value.trim();
    if (instr) q.instruction = instr;
    return q;
  }

  function shellQuote(s) { return "'" + String(s).replace(/'/g, "'\\''") + "'"; }

  // The request as curl, images read from files of the same names.
  function curlFor(path, body, imageNames) {
    let json = JSON.stringify(body, null, 1);
    const marker = /"@@IMG(\d+)@@"/g;
    json = json.replace(marker, (_, i) => "\"'\"$(base64 -w0 " + shellQuote(imageNames[Number(i)]) + ")\"'\"");
    const lines = ["curl -s " + location.origin + path + " \\", "  -H 'Content-Type: application/json' \\"];
    if ($("api-key").value.trim()) lines.push("  -H \"Authorization: Bearer $VLEMBED_API_KEY\" \\");
    lines.push("  -d '" + json.replace(/\n\s*/g, " ") + "'");
    return lines.join("\n");
  }

  function withPlaceholders(input, names, img) {
    if (!img) return input;
    const copy = Object.assign({}, input);
    copy.image = "@@IMG" + names.length + "@@";
    names.push(img.name);
    return copy;
  }

  // Marks the image an error message names (query / candidates[i] / inputs[i]).
  function attachError(msg, cands, offset) {
    let m = /^candidates\[(\d+)\]/.exec(msg);
    let idx = m ? Number(m[1]) : null;
    if (idx === null) { m = /^inputs\[(\d+)\]/.exec(msg); if (m) idx = Number(m[1]) - offset; }
    if (/^query\b/.test(msg) || idx === -1) {
      if (state.query) { state.query.error = msg; return true; }
      return false;
    }
    if (idx !== null && cands[idx] && cands[idx].kind === "image") {
      cands[idx].img.error = msg; return true;
    }
    return false;
  }

  function dot(a, b) { let s = 0; for (let i = 0; i < a.length; i++) s += a[i] * b[i]; return s; }

  async function run() {
    setError("");
    $("results").textContent = "";
    if (state.query) state.query.error = "";
    state.candidates.forEach((c) => { c.error = ""; });
    render();
    const query = queryInput();
    const cands = candidateList();
    if (!query.text && !query.image) { setError("Give a query: a text, an image, or both."); return; }
    if (cands.length === 0) { setError("Give at least one candidate image or text."); return; }
    const model = $("model").value;
    const role = $("role").value;
    const names = [];
    const q = withPlaceholders(query, names, state.query);
    const candInputs = cands.map((c) => c.kind === "image" ? { image: c.img.base64 } : c.text);
    const candShown = cands.map((c) => c.kind === "image" ? withPlaceholders({ image: "" }, names, c.img) : c.text);
    let path, body, shown;
    if (role === "query") {
      path = "/score";
      body = { query: query, candidates: candInputs, top_k: cands.length };
      shown = { query: q, candidates: candShown, top_k: cands.length };
    } else {
      path = "/embed";
      const qr = Object.assign({ role: "candidate" }, query);
      body = { inputs: [qr].concat(candInputs) };
      shown = { inputs: [Object.assign({ role: "candidate" }, q)].concat(candShown) };
    }
    if (model) { body = Object.assign({ model }, body); shown = Object.assign({ model }, shown); }
    $("curl").textContent = curlFor(path, shown, names);
    $("run").disabled = true;
    $("status").textContent = "running…";
    const started = performance.now();
    let res;
    try {
      res = await fetch(path, { method: "POST", headers: headers(true), body: JSON.stringify(body) });
    } catch (e) {
      setError("request failed: " + e);
      $("run").disabled = false; $("status").textContent = "";
      return;
    }
    $("run").disabled = false;
    const ms = Math.round(performance.now() - started);
    const rid = res.headers.get("x-request-id") || "";
    if (!res.ok) {
      const e = await errorText(res);
      const placed = attachError(e.message, cands, 1);
      render();
      setError(res.status + " " + (e.type || "") + ": " + e.message + (placed ? " (marked next to the image)" : "") +
        (rid ? " · request id " + rid : ""));
      $("status").textContent = "";
      if (res.status === 401) loadInfo();
      return;
    }
    const out = await res.json();
    let ranking;
    if (path === "/score") {
      ranking = out.ranking || out.scores.map((score, index) => ({ index, score }));
    } else {
      const v = out.embeddings;
      ranking = v.slice(1).map((e, index) => ({ index, score: dot(v[0], e) / (Math.hypot(...v[0]) * Math.hypot(...e) || 1) }));
      ranking.sort((a, b) => b.score - a.score || a.index - b.index);
    }
    $("status").textContent = ms + " ms · " + out.model + (rid ? " · request id " + rid : "");
    showRanking(ranking, cands);
  }

  function showRanking(ranking, cands) {
    const ol = $("results");
    ol.textContent = "";
    const max = Math.max(1e-9, ...ranking.map((r) => Math.abs(r.score)));
    ranking.forEach((r, pos) => {
      const c = cands[r.index];
      const li = document.createElement("li");
      li.className = "result";
      li.dataset.index = r.index;
      li.dataset.score = r.score;
      const rank = document.createElement("span");
      rank.className = "rank"; rank.textContent = pos + 1 + ".";
      li.appendChild(rank);
      if (c.kind === "image") {
        const img = document.createElement("img");
        img.src = c.img.dataUrl; img.alt = c.img.name;
        li.appendChild(img);
      }
      const what = document.createElement("div");
      what.className = "what";
      what.textContent = c.kind === "image" ? c.img.name : c.text;
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.style.width = Math.max(2, (100 * Math.abs(r.score)) / max) + "%";
      what.appendChild(bar);
      li.appendChild(what);
      const s = document.createElement("span");
      s.className = "score"; s.textContent = r.score.toFixed(4);
      li.appendChild(s);
      ol.appendChild(li);
    });
  }

  dropZone($("query-drop"), $("query-image-input"), false, async (files) => {
    if (files[0]) { state.query = await toImage(files[0]); render(); }
  });
  dropZone($("cand-drop"), $("candidate-images-input"), true, async (files) => {
    for (const f of files) state.candidates.push(await toImage(f));
    render();
  });
  $("model").onchange = showModel;
  $("api-key").onchange = loadInfo;
  $("run").onclick = run;
  loadInfo();
})();
