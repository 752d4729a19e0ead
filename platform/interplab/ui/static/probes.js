// Probe run: held-out and training accuracy per layer (one series per site and measure), and the
// majority-class floor, as a line chart; hovering a point shows its layer and accuracy.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const { pageData, lineChart } = window.interplab;
  const data = pageData();
  const root = document.getElementById("probe-chart");
  if (!data || !root || !data.probes.length) return;
  const sites = [...new Set(data.probes.map((p) => p.site))];
  const series = [];
  for (const site of sites) {
    const rows = data.probes.filter((p) => p.site === site && p.layer !== null);
    series.push({ name: `${site} test`, points: rows.map((p) => [p.layer, p.test_accuracy]) });
    series.push({ name: `${site} train`, points: rows.map((p) => [p.layer, p.train_accuracy]) });
    series.push({ name: `${site} majority`, points: rows.map((p) => [p.layer, p.majority]) });
  }
  const chart = lineChart(root, series, { xLabel: "layer", yLabel: "accuracy" });
  chart.classList.add("probe-accuracy");
});
