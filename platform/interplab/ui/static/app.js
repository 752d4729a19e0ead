// interplab dashboard: shared helpers (SVG elements, tooltips, colour scales, a line chart) and the
// log-out / CSRF plumbing. Text from the store is only ever set with textContent or attributes.
"use strict";
(function () {
  const SVG_NS = "http://www.w3.org/2000/svg";

  function svg(tag, attrs, parent) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
    if (parent) parent.appendChild(el);
    return el;
  }

  function el(tag, attrs, text, parent) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (parent) parent.appendChild(node);
    return node;
  }

  function pageData() {
    const block = document.getElementById("page-data");
    return block ? JSON.parse(block.textContent) : null;
  }

  // Tooltip: lines of "label: value", placed next to the pointer.
  function showTip(event, lines) {
    const tip = document.getElementById("tooltip");
    tip.replaceChildren();
    for (const [label, value] of lines) {
      const row = el("div", {}, null, tip);
      el("span", { class: "tip-label" }, label + ": ", row);
      el("span", { class: "tip-value", "data-label": label }, value, row);
    }
    tip.hidden = false;
    tip.style.left = event.pageX + 14 + "px";
    tip.style.top = event.pageY + 14 + "px";
  }

  function hideTip() {
    document.getElementById("tooltip").hidden = true;
  }

  // Diverging blue (positive) / red (negative) around 0, |v| / limit in [0, 1].
  function diverging(v, limit) {
    if (v === null || v === undefined || Number.isNaN(v)) return "#dddddd";
    const t = Math.max(-1, Math.min(1, v / (limit || 1)));
    const a = Math.abs(t);
    const mix = (c) => Math.round(255 + (c - 255) * a);
    return t >= 0 ? `rgb(${mix(33)},${mix(102)},${mix(172)})` : `rgb(${mix(178)},${mix(24)},${mix(43)})`;
  }

  function fmt(v, digits) {
    if (v === null || v === undefined) return "—";
    return Number(v).toPrecision(digits || 4);
  }

  // A small line chart: series = [{name, points: [[x, y], ...]}].
  function lineChart(container, series, opts) {
    const W = opts.width || 560, H = opts.height || 300, L = 50, B = 36, T = 14, R = 150;
    const root = svg("svg", { width: W + R, height: H, class: "linechart", role: "img" }, container);
    const xs = series.flatMap((s) => s.points.map((p) => p[0]));
    const ys = series.flatMap((s) => s.points.map((p) => p[1])).filter((y) => y !== null);
    if (!xs.length) return root;
    const x0 = Math.min(...xs), x1 = Math.max(...xs);
    const y0 = Math.min(0, ...ys), y1 = Math.max(1, ...ys);
    const sx = (x) => L + ((x - x0) / (x1 - x0 || 1)) * (W - L - 10);
    const sy = (y) => H - B - ((y - y0) / (y1 - y0 || 1)) * (H - B - T);
    svg("line", { x1: L, y1: H - B, x2: W - 10, y2: H - B, class: "axis" }, root);
    svg("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }, root);
    for (const y of [y0, (y0 + y1) / 2, y1]) {
      svg("text", { x: L - 6, y: sy(y) + 4, "text-anchor": "end", class: "tick" }, root).textContent = fmt(y, 3);
    }
    for (const x of [x0, (x0 + x1) / 2, x1]) {
      svg("text", { x: sx(x), y: H - B + 16, "text-anchor": "middle", class: "tick" }, root).textContent = fmt(x, 3);
    }
    svg("text", { x: (L + W) / 2, y: H - 4, "text-anchor": "middle", class: "label" }, root).textContent = opts.xLabel || "";
    const palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f"];
    series.forEach((s, i) => {
      const color = palette[i % palette.length];
      const pts = s.points.filter((p) => p[1] !== null);
      svg("polyline", { points: pts.map((p) => `${sx(p[0])},${sy(p[1])}`).join(" "), fill: "none", stroke: color, "stroke-width": 2, class: "series" }, root);
      for (const p of pts) {
        const dot = svg("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 3, fill: color, class: "point" }, root);
        dot.addEventListener("mousemove", (e) => showTip(e, [["series", s.name], [opts.xLabel || "x", fmt(p[0])], [opts.yLabel || "y", fmt(p[1])]]));
        dot.addEventListener("mouseleave", hideTip);
      }
      svg("rect", { x: W + 4, y: T + i * 18, width: 12, height: 3, fill: color }, root);
      svg("text", { x: W + 20, y: T + i * 18 + 5, class: "legend" }, root).textContent = s.name;
    });
    return root;
  }

  function csrfToken() {
    const meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.getAttribute("content") : "";
  }

  async function post(url) {
    const response = await fetch(url, { method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrfToken() } });
    let body = {};
    try {
      body = await response.json();
    } catch (err) {
      body = { error: "HTTP " + response.status };
    }
    return { ok: response.ok, status: response.status, body: body };
  }

  window.interplab = { svg, el, pageData, showTip, hideTip, diverging, fmt, lineChart, post };

  document.addEventListener("DOMContentLoaded", () => {
    const logout = document.getElementById("logout");
    if (logout) {
      logout.addEventListener("click", async () => {
        await post("/logout");
        window.location.assign("/runs");
      });
    }
  });
})();
