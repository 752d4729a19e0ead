// Capture coverage: a sites x layers grid; each cell shows the rows captured there.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const { svg, pageData, showTip, hideTip } = window.interplab;
  const data = pageData();
  const root = document.getElementById("coverage");
  if (!data || !root) return;
  const sites = [...new Set(data.coverage.map((c) => c.site))].sort();
  const layers = [...new Set(data.coverage.map((c) => (c.layer === null ? -1 : c.layer)))].sort((a, b) => a - b);
  const CELL = 40, LEFT = 110, TOP = 24;
  const chart = svg("svg", { width: LEFT + layers.length * CELL + 10, height: TOP + sites.length * CELL + 10, class: "coverage" }, root);
  const most = Math.max(1, ...data.coverage.map((c) => c.n_rows));
  layers.forEach((l, j) => {
    svg("text", { x: LEFT + j * CELL + CELL / 2, y: TOP - 8, "text-anchor": "middle", class: "tick" }, chart).textContent = l < 0 ? "—" : String(l);
  });
  sites.forEach((s, i) => {
    svg("text", { x: LEFT - 8, y: TOP + i * CELL + CELL * 0.6, "text-anchor": "end", class: "tick" }, chart).textContent = s;
  });
  for (const c of data.coverage) {
    const i = sites.indexOf(c.site), j = layers.indexOf(c.layer === null ? -1 : c.layer);
    const shade = 0.25 + 0.75 * (c.n_rows / most);
    const rect = svg("rect", {
      x: LEFT + j * CELL, y: TOP + i * CELL, width: CELL - 2, height: CELL - 2, class: "cell",
      fill: `rgba(33,102,172,${shade.toFixed(3)})`, "data-site": c.site, "data-layer": c.layer === null ? "" : c.layer, "data-rows": c.n_rows,
    }, chart);
    rect.addEventListener("mousemove", (e) => showTip(e, [["site", c.site], ["layer", c.layer === null ? "—" : String(c.layer)], ["rows", String(c.n_rows)], ["prompts", String(c.n_prompts)], ["positions", String(c.n_positions)], ["heads", String(c.n_heads)]]));
    rect.addEventListener("mouseleave", hideTip);
  }
});
