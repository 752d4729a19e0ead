// Activation browser: keep the hidden run/site/layer fields in step with the picker, shade each
// token by its activation (blue positive, red negative, scaled by the largest |activation| shown),
// and draw the histogram.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const { svg, pageData, showTip, hideTip, diverging, fmt } = window.interplab;
  const where = document.getElementById("where");
  function sync() {
    if (!where || !where.value) return;
    const [run, site, layer] = where.value.split("|");
    document.getElementById("run_id").value = run;
    document.getElementById("site").value = site;
    document.getElementById("layer").value = layer;
  }
  if (where) {
    where.addEventListener("change", sync);
    if (!document.getElementById("run_id").value) sync();
  }
  const data = pageData();
  if (!data) return;
  const tokens = [...document.querySelectorAll(".tok[data-activation]")];
  const limit = Math.max(1e-12, ...tokens.map((t) => Math.abs(Number(t.getAttribute("data-activation")))));
  for (const t of tokens) {
    const v = Number(t.getAttribute("data-activation"));
    t.style.backgroundColor = diverging(v, limit);
    if (Math.abs(v) / limit > 0.6) t.classList.add("strong");
    t.addEventListener("mousemove", (e) => showTip(e, [["token", JSON.stringify(t.textContent)], ["position", t.getAttribute("data-position")], ["activation", fmt(v, 5)]]));
    t.addEventListener("mouseleave", hideTip);
  }
  const h = data.histogram, box = document.getElementById("histogram");
  if (!box || !h.counts.length || h.lo === null) return;
  const W = 560, H = 180, L = 40, B = 28;
  const chart = svg("svg", { width: W, height: H, class: "histogram" }, box);
  const most = Math.max(1, ...h.counts);
  const bw = (W - L - 10) / h.counts.length;
  h.counts.forEach((n, i) => {
    const height = ((H - B - 10) * n) / most;
    const lo = h.lo + ((h.hi - h.lo) * i) / h.counts.length, hi = h.lo + ((h.hi - h.lo) * (i + 1)) / h.counts.length;
    const bar = svg("rect", { x: L + i * bw, y: H - B - height, width: Math.max(1, bw - 1), height: height, class: "bar", "data-count": n }, chart);
    bar.addEventListener("mousemove", (e) => showTip(e, [["range", `${fmt(lo, 3)} … ${fmt(hi, 3)}`], ["count", String(n)]]));
    bar.addEventListener("mouseleave", hideTip);
  });
  svg("text", { x: L, y: H - 8, class: "tick" }, chart).textContent = fmt(h.lo, 3);
  svg("text", { x: W - 10, y: H - 8, "text-anchor": "end", class: "tick" }, chart).textContent = fmt(h.hi, 3);
  svg("text", { x: L - 4, y: 14, "text-anchor": "end", class: "tick" }, chart).textContent = String(most);
});
