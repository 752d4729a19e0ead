// SQL console: show a saved query's SQL on demand.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll(".show-sql")) {
    button.addEventListener("click", () => {
      const pre = document.getElementById(button.getAttribute("data-target"));
      pre.hidden = !pre.hidden;
    });
  }
});
