"""The Jobs page against a real Ray head (the shared ``ray_head`` fixture, token auth): a tiny
submitted job shows with its status and logs; stopping it without the CSRF token is refused, with
the token it stops."""

from __future__ import annotations

import time

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from .conftest import LOGIN_TOKEN, console_errors, free_port, screenshot, serve
from .test_pages import not_blank


def wait_status(client, submission_id: str, states: set[str], timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while True:  # bounded wait on the Jobs API's own state
        status = str(client.get_job_status(submission_id).value)
        if status in states or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


@pytest.mark.slow
def test_jobs_page_status_logs_and_stop(ray_head, ui_store, tokens_file, tmp_path, browser):
    from interplab.store import open_store
    from interplab.ui.app import create_app
    from interplab.ui.config import UIConfig
    from ray.job_submission import JobSubmissionClient

    token_file = tmp_path / "ray-token"
    token_file.write_text(ray_head["token"])
    jobs = JobSubmissionClient(ray_head["address"], headers={"Authorization": f"Bearer {ray_head['token']}"})
    submission_id = jobs.submit_job(
        entrypoint="python -c \"import time; print('ui-test job started', flush=True); time.sleep(600)\"",
        metadata={"interplab_run_id": "capture-ui-test"},
    )
    assert wait_status(jobs, submission_id, {"RUNNING", "FAILED", "SUCCEEDED"}) == "RUNNING"
    while "ui-test job started" not in jobs.get_job_logs(submission_id):  # bounded by the job's own start
        assert wait_status(jobs, submission_id, {"FAILED", "STOPPED", "SUCCEEDED"}, timeout=1) == "RUNNING"

    path, _ = ui_store
    store = open_store(str(path), create=False)
    port = free_port()
    config = UIConfig(
        store=str(path), port=port, tokens=tokens_file, jobs_address=ray_head["address"], ray_token_file=str(token_file)
    )
    try:
        for url in serve(create_app(config, store), port):
            browser.get(f"{url}/jobs")
            row = browser.find_element(By.CSS_SELECTOR, f"tr.job-row[data-submission-id='{submission_id}']")
            assert row.find_element(By.CSS_SELECTOR, ".job-status").text == "RUNNING"
            assert "capture-ui-test" in row.text and "not in this store" in row.text
            assert row.find_elements(By.CSS_SELECTOR, "button.stop-job") == []  # not logged in: no stop button

            browser.get(f"{url}/jobs/{submission_id}")
            assert "ui-test job started" in browser.find_element(By.ID, "job-logs").text

            browser.get(f"{url}/login?next=/jobs")  # log in with the model service's token file
            browser.find_element(By.ID, "token").send_keys(LOGIN_TOKEN)
            browser.find_element(By.ID, "login-submit").click()
            # the URL changes before the new page's DOM is there: wait for the page itself
            WebDriverWait(browser, 60).until(lambda d: d.current_url.endswith("/jobs") and d.find_elements(By.ID, "user"))
            assert browser.find_element(By.ID, "user").text == "alice"
            not_blank(screenshot(browser, "jobs-running"))

            # a request without the CSRF token (what another site's page could send) is refused
            refused = browser.execute_async_script(
                "const done = arguments[arguments.length - 1];"
                f"fetch('/api/jobs/{submission_id}/stop', {{method: 'POST', credentials: 'same-origin'}})"
                ".then(r => done(r.status));"
            )
            assert refused == 403
            assert str(jobs.get_job_status(submission_id).value) == "RUNNING"

            button = browser.find_element(By.CSS_SELECTOR, f"button.stop-job[data-submission-id='{submission_id}']")
            button.click()
            WebDriverWait(browser, 30).until(lambda d, b=button: "stopped" in b.get_attribute("class"))
            assert wait_status(jobs, submission_id, {"STOPPED", "FAILED", "SUCCEEDED"}) == "STOPPED"
            browser.get(f"{url}/jobs")
            row = browser.find_element(By.CSS_SELECTOR, f"tr.job-row[data-submission-id='{submission_id}']")
            assert row.find_element(By.CSS_SELECTOR, ".job-status").text == "STOPPED"
            errors = [e for e in console_errors(browser) if "/stop" not in e["message"]]  # the refused 403 is logged
            assert errors == []
    finally:
        if str(jobs.get_job_status(submission_id).value) not in ("STOPPED", "FAILED", "SUCCEEDED"):
            jobs.stop_job(submission_id)
        store.close()
        browser.delete_all_cookies()
