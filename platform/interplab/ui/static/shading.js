// Token shading of the attribution and partition pages: each group of tokens (.tokens) is shaded
// by its tokens' data-value (blue positive, red negative, scaled by the group's largest |value|);
// hovering a token shows its text, position and value. Region members' own tokens are marked by CSS.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const { showTip, hideTip, diverging, fmt } = window.interplab;
  for (const group of document.querySelectorAll(".tokens")) {
    const tokens = [...group.querySelectorAll(".tok")];
    const valued = tokens.filter((t) => t.hasAttribute("data-value"));
    const limit = Math.max(1e-12, ...valued.map((t) => Math.abs(Number(t.getAttribute("data-value")))));
    for (const t of valued) {
      const v = Number(t.getAttribute("data-value"));
      t.style.backgroundColor = diverging(v, limit);
      if (Math.abs(v) / limit > 0.6) t.classList.add("strong");
    }
    for (const t of tokens) {
      const lines = [["token", JSON.stringify(t.textContent)], ["position", t.getAttribute("data-position")]];
      if (t.hasAttribute("data-value")) lines.push(["value", fmt(Number(t.getAttribute("data-value")), 5)]);
      t.addEventListener("mousemove", (e) => showTip(e, lines));
      t.addEventListener("mouseleave", hideTip);
    }
  }
});
