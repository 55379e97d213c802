"use strict";
// Renders the server's own /openapi.json for reading. No network access
// beyond this server; no third-party code.
(function () {
  const $ = (id) => document.getElementById(id);
  let doc = null;

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v; else e.setAttribute(k, v);
    }
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      e.append(c instanceof Node ? c : String(c));
    }
    return e;
  }

  // Minimal inline Markdown: `code` spans; everything else as text.
  function md(text) {
    const span = el("div", { class: "desc" });
    String(text || "").trim().split(/(`[^`]+`)/).forEach((part) => {
      if (/^`[^`]+`$/.test(part)) span.append(el("code", {}, part.slice(1, -1)));
      else span.append(part);
    });
    return span;
  }

  function resolve(s, seen) {
    let depth = 0;
    while (s && s.$ref && depth++ < 32) {
      const ptr = s.$ref.replace(/^#\//, "").split("/").map((p) => p.replace(/~1/g, "/").replace(/~0/g, "~"));
      let cur = doc;
      for (const p of ptr) cur = cur && cur[p];
      if (seen) seen.push(s.$ref);
      s = cur;
    }
    return s || {};
  }

  function refName(s) { return s && s.$ref ? s.$ref.split("/").pop() : ""; }

  function typeOf(s) {
    const name = refName(s);
    const r = resolve(s);
    let t;
    if (r.oneOf || r.anyOf) t = (r.oneOf || r.anyOf).map(typeOf).join(" | ");
    else if (r.type === "array") t = "array of " + typeOf(r.items || {});
    else if (r.enum) t = r.enum.map((v) => JSON.stringify(v)).join(" | ");
    else t = Array.isArray(r.type) ? r.type.join(" | ") : (r.type || (r.properties ? "object" : "any"));
    return name && !r.enum ? name + (r.type && r.type !== "object" ? " (" + t + ")" : "") : t;
  }

  function constraints(r) {
    const out = [];
    for (const k of ["minimum", "maximum", "minItems", "maxItems", "minLength", "maxLength", "default", "format"]) {
      if (r[k] !== undefined) out.push(k + ": " + JSON.stringify(r[k]));
    }
    return out.join(", ");
  }

  // A schema as a table of properties; nested objects fold out.
  function schemaView(s, depth) {
    const r = resolve(s);
    const box = el("div", {});
    if (r.description) box.append(md(r.description));
    const variants = r.oneOf || r.anyOf;
    if (variants && depth < 6) {
      const list = el("ul", {});
      variants.forEach((v) => {
        const vr = resolve(v);
        const li = el("li", {}, el("span", { class: "type" }, typeOf(v)));
        if (vr.properties && depth < 5) li.append(schemaView(v, depth + 1));
        list.append(li);
      });
      box.append(el("div", { class: "muted" }, "one of:"), list);
    }
    const props = r.properties || {};
    const names = Object.keys(props);
    if (names.length) {
      const req = new Set(r.required || []);
      const t = el("table", {}, el("tr", {}, el("th", {}, "field"), el("th", {}, "type"), el("th", {}, "description")));
      for (const n of names) {
        const p = props[n];
        const pr = resolve(p);
        const desc = el("td", {});
        if (pr.description || p.description) desc.append(md(p.description || pr.description));
        const c = constraints(pr);
        if (c) desc.append(el("div", { class: "type" }, c));
        const inner = pr.type === "array" ? resolve(pr.items || {}) : pr;
        if (inner.properties && depth < 5) {
          desc.append(el("details", {}, el("summary", {}, "fields"), schemaView(pr.type === "array" ? pr.items : p, depth + 1)));
        }
        t.append(el("tr", {},
          el("td", { class: "name" }, n, req.has(n) ? el("span", { class: "req" }, " required") : null),
          el("td", { class: "type" }, typeOf(p)), desc));
      }
      box.append(t);
    }
    if (r.additionalProperties && typeof r.additionalProperties === "object") {
      box.append(el("div", { class: "type" }, "values: " + typeOf(r.additionalProperties)));
    }
    if (r.type === "array" && r.items && depth < 6) {
      box.append(el("div", { class: "type" }, "items: " + typeOf(r.items)));
      if (resolve(r.items).properties) box.append(schemaView(r.items, depth + 1));
    }
    return box;
  }

  function content(c) {
    const box = el("div", {});
    for (const [type, media] of Object.entries(c || {})) {
      box.append(el("div", {}, el("code", {}, type), media.schema ? el("span", { class: "type" }, " " + typeOf(media.schema)) : null));
      if (media.schema) box.append(schemaView(media.schema, 0));
    }
    return box;
  }

  function operation(path, method, op) {
    const id = "op-" + (op.operationId || method + path.replace(/[^a-z0-9]/gi, "-"));
    const card = el("section", { class: "card op", id });
    card.append(el("h2", {}, el("span", { class: "method " + method }, method), el("span", { class: "path" }, path),
      op.summary ? el("span", {}, op.summary) : null));
    if (op.description) card.append(md(op.description));
    const open = op.security && op.security.some((s) => Object.keys(s).length === 0);
    card.append(el("div", { class: "muted" }, open ? "No API key needed." : "Needs the API key (Authorization: Bearer <key>) when the server has keys."));
    if (op.parameters && op.parameters.length) {
      card.append(el("h3", {}, "Parameters"));
      const t = el("table", {});
      op.parameters.map((p) => resolve(p)).forEach((p) => t.append(el("tr", {}, el("td", { class: "name" }, p.name),
        el("td", { class: "type" }, p.in + " · " + typeOf(p.schema || {})), el("td", {}, md(p.description)))));
      card.append(t);
    }
    if (op.requestBody) {
      const rb = resolve(op.requestBody);
      card.append(el("h3", {}, "Request body" + (rb.required ? " (required)" : "")));
      card.append(content(rb.content));
    }
    card.append(el("h3", {}, "Responses"));
    for (const [status, resp0] of Object.entries(op.responses || {})) {
      const resp = resolve(resp0);
      const d = el("details", {}, el("summary", {}, el("span", { class: "status" }, status), " ", resp.description || ""));
      if (resp.headers) {
        for (const [h, hv] of Object.entries(resp.headers)) d.append(el("div", {}, "header ", el("code", {}, h), " ", md(resolve(hv).description)));
      }
      d.append(content(resp.content));
      card.append(d);
    }
    return card;
  }

  async function main() {
    let res;
    try { res = await fetch("/openapi.json"); } catch (e) { $("error").textContent = "cannot load /openapi.json: " + e; return; }
    if (!res.ok) { $("error").textContent = "cannot load /openapi.json: " + res.status; return; }
    doc = await res.json();
    document.title = (doc.info && doc.info.title || "API") + " docs";
    $("version").textContent = "version " + (doc.info && doc.info.version || "?");
    $("intro").append(el("h2", {}, doc.info.title), md(doc.info.description));
    const ops = $("ops");
    $("toc").append(el("strong", {}, "Endpoints: "));
    for (const [path, item] of Object.entries(doc.paths || {})) {
      for (const method of ["get", "post", "put", "patch", "delete"]) {
        if (!item[method]) continue;
        const card = operation(path, method, item[method]);
        ops.append(card);
        $("toc").append(el("a", { href: "#" + card.id }, method.toUpperCase() + " " + path));
      }
    }
  }
  main();
})();
