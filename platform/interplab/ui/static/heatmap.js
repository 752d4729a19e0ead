// Patching heatmaps: one SVG per (sweep, method) panel; rows are layers (0 at the bottom), columns
// token positions (labelled with the clean prompt's tokens) or heads. Hover: layer, token, values.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const { svg, el, pageData, showTip, hideTip, diverging, fmt } = window.interplab;
  const data = pageData();
  const root = document.getElementById("heatmaps");
  if (!data || !root) return;
  const CELL = 26, LEFT = 64, TOP = 16, BOTTOM = 110;
  for (const panel of data.panels) {
    const box = el("figure", { class: "panel heatmap-panel" }, null, root);
    el("figcaption", {}, `${panel.sweep} (${panel.method}), layer × ${panel.axis}`, box);
    const layers = Math.max(...panel.cells.map((c) => c.layer)) + 1;
    const width = Math.max(...panel.cells.map((c) => c.x)) + 1;
    const limit = Math.max(1e-12, ...panel.cells.map((c) => Math.abs(c.normalized || 0)));
    const W = LEFT + width * CELL + 10, H = TOP + layers * CELL + BOTTOM;
    const chart = svg("svg", { width: W, height: H, class: "heatmap", "data-sweep": panel.sweep, "data-method": panel.method }, box);
    const byToken = panel.axis === "position";
    for (const c of panel.cells) {
      const token = byToken ? (data.tokens[c.x] !== undefined ? data.tokens[c.x] : "") : "";
      const rect = svg("rect", {
        x: LEFT + c.x * CELL, y: TOP + (layers - 1 - c.layer) * CELL, width: CELL - 1, height: CELL - 1,
        fill: diverging(c.normalized, limit), class: "cell",
        "data-layer": c.layer, "data-x": c.x, "data-value": c.value, "data-normalized": c.normalized,
      }, chart);
      if (byToken) rect.setAttribute("data-token", token);
      const lines = [["layer", String(c.layer)]];
      if (byToken) lines.push(["token", `${c.x}: ${JSON.stringify(token)}`]);
      else if (panel.axis !== "layer") lines.push(["head", String(c.x)]);
      lines.push(["value", fmt(c.value, 6)], ["normalized", fmt(c.normalized, 6)]);
      rect.addEventListener("mousemove", (e) => showTip(e, lines));
      rect.addEventListener("mouseleave", hideTip);
    }
    for (let l = 0; l < layers; l++) {
      svg("text", { x: LEFT - 6, y: TOP + (layers - 1 - l) * CELL + CELL * 0.65, "text-anchor": "end", class: "tick" }, chart).textContent = String(l);
    }
    for (let x = 0; x < width; x++) {
      const label = byToken ? `${x} ${data.tokens[x] !== undefined ? data.tokens[x] : ""}` : String(x);
      const cx = LEFT + x * CELL + CELL / 2, cy = TOP + layers * CELL + 6;
      svg("text", { x: cx, y: cy, transform: `rotate(60 ${cx} ${cy})`, class: "tick xtick" }, chart).textContent = label;
    }
    svg("text", { x: 12, y: TOP + (layers * CELL) / 2, transform: `rotate(-90 12 ${TOP + (layers * CELL) / 2})`, "text-anchor": "middle", class: "label" }, chart).textContent = "layer";
  }
});
