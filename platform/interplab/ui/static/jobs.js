// Jobs: "stop" posts to the dashboard's API with the page's CSRF token, then reloads.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const { post } = window.interplab;
  const problem = document.getElementById("stop-error");
  for (const button of document.querySelectorAll(".stop-job")) {
    button.addEventListener("click", async () => {
      const id = button.getAttribute("data-submission-id");
      button.disabled = true;
      const result = await post(`/api/jobs/${encodeURIComponent(id)}/stop`);
      if (result.ok) {
        button.textContent = "stop requested";
        button.classList.add("stopped");
      } else {
        problem.textContent = result.body.error || `HTTP ${result.status}`;
        problem.hidden = false;
        button.disabled = false;
      }
    });
  }
});
