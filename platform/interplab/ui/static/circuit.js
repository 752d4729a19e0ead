// Circuit graph: nodes by layer (input at the bottom, logits on top; heads left to right, the MLP
// at the right end), one path per edge, width and colour by score; a |score| threshold slider hides
// weaker edges. Faithfulness curves below.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const { svg, el, pageData, showTip, hideTip, fmt, lineChart } = window.interplab;
  const data = pageData();
  const root = document.getElementById("circuit-graph");
  if (!data || !root) return;
  const select = document.getElementById("circuit-method");
  const slider = document.getElementById("threshold");
  const shown = document.getElementById("threshold-value");
  const counter = document.getElementById("edge-count");

  // MIB node names: input, logits, a<L>.h<H> (with a q/k/v suffix on destinations), m<L>.
  function parse(name) {
    if (name === "input") return { key: "input", kind: "input", layer: -1, index: 0 };
    if (name === "logits") return { key: "logits", kind: "logits", layer: Infinity, index: 0 };
    let m = /^a(\d+)\.h(\d+)(<[qkv]>)?$/.exec(name);
    if (m) return { key: `a${m[1]}.h${m[2]}`, kind: "head", layer: +m[1], index: +m[2], feeds: m[3] ? m[3][1] : null };
    m = /^m(\d+)$/.exec(name);
    if (m) return { key: name, kind: "mlp", layer: +m[1], index: Infinity };
    return { key: name, kind: "other", layer: 0, index: 0 };
  }

  function draw(graph) {
    root.replaceChildren();
    const nodes = new Map();
    const edges = graph.edges.map((e) => {
      const s = parse(e.src), d = parse(e.dst);
      nodes.set(s.key, s);
      nodes.set(d.key, d);
      return { ...e, s, d };
    });
    const layers = [...nodes.values()].filter((n) => Number.isFinite(n.layer) && n.layer >= 0).map((n) => n.layer);
    const nLayers = layers.length ? Math.max(...layers) + 1 : 1;
    const heads = [...nodes.values()].filter((n) => n.kind === "head").map((n) => n.index);
    const nHeads = heads.length ? Math.max(...heads) + 1 : 1;
    const DX = 70, DY = 64, LEFT = 40, TOP = 30;
    const W = LEFT * 2 + (nHeads + 1) * DX, H = TOP * 2 + (nLayers + 1) * DY;
    const row = (n) => (n.kind === "input" ? -1 : n.kind === "logits" ? nLayers : n.layer);
    const col = (n) => (n.kind === "head" ? n.index : n.kind === "mlp" ? nHeads : (nHeads - 1) / 2 + 0.5);
    const pos = (n) => [LEFT + col(n) * DX + DX / 2, TOP + (nLayers - row(n)) * DY];
    const chart = svg("svg", { width: W, height: H, class: "circuit", "data-method": graph.method }, root);
    const top = Math.max(1e-12, ...edges.map((e) => Math.abs(e.score || 0)));
    const paths = [];
    for (const e of edges) {
      const [x0, y0] = pos(e.s), [x1, y1] = pos(e.d);
      const bend = (x1 - x0) * 0.15 + 12;
      const path = svg("path", {
        d: `M${x0},${y0} Q${(x0 + x1) / 2 + bend},${(y0 + y1) / 2} ${x1},${y1}`,
        class: "edge" + (e.in_circuit ? " in-circuit" : ""),
        stroke: (e.score || 0) >= 0 ? "#2166ac" : "#b2182b",
        "stroke-width": 0.6 + (4 * Math.abs(e.score || 0)) / top,
        "data-src": e.src, "data-dst": e.dst, "data-score": e.score,
      }, chart);
      path.addEventListener("mousemove", (ev) => showTip(ev, [["edge", `${e.src} → ${e.dst}`], ["score", fmt(e.score, 6)], ["in circuit", e.in_circuit ? "yes" : "no"]]));
      path.addEventListener("mouseleave", hideTip);
      paths.push(path);
    }
    for (const n of nodes.values()) {
      const [x, y] = pos(n);
      const g = svg("g", { class: "node node-" + n.kind, "data-node": n.key }, chart);
      svg("rect", { x: x - 26, y: y - 10, width: 52, height: 20, rx: 5 }, g);
      svg("text", { x: x, y: y + 4, "text-anchor": "middle" }, g).textContent = n.key;
    }
    function apply() {
      const threshold = (Number(slider.value) / 1000) * top;
      shown.textContent = fmt(threshold, 3);
      let visible = 0;
      for (const p of paths) {
        const on = Math.abs(Number(p.getAttribute("data-score"))) >= threshold;
        p.style.display = on ? "" : "none";
        p.classList.toggle("hidden-edge", !on);
        if (on) visible++;
      }
      counter.textContent = `${visible} of ${graph.edges.length} edges shown` + (graph.n_edges > graph.edges.length ? ` (the ${graph.edges.length} strongest of ${graph.n_edges})` : "");
    }
    slider.oninput = apply;
    apply();
  }

  if (data.graphs.length) draw(data.graphs[0]);
  select.addEventListener("change", () => draw(data.graphs[Number(select.value)]));

  const curves = new Map();
  for (const c of data.curves) {
    const name = `${c.method} ${c.rule}${c.absolute ? " |score|" : ""}`;
    if (!curves.has(name)) curves.set(name, []);
    curves.get(name).push([c.fraction, c.faithfulness]);
  }
  const box = document.getElementById("faithfulness");
  if (curves.size) {
    lineChart(box, [...curves.entries()].map(([name, points]) => ({ name, points })), { xLabel: "fraction of edges", yLabel: "faithfulness" });
  } else {
    el("p", { class: "note" }, "no faithfulness curves in this run", box);
  }
});
