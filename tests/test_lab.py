"""The prebuilt JupyterLab extension in a real JupyterLab, driven through Debian's chromium by Playwright: the
install enables it, its "MPI runs" panel lists a run a real mpiexec script started, the counts move, it polls
only while visible, and a click opens the run in a main-area tab with its ranks, (escaped) failures and any job's
output, asked for by its number."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import BIN, CHROMIUM, CHROMIUM_ARGS, REPO, free_port, wait_for_jupyter

ARTIFACTS = os.path.join(REPO, "test-artifacts")
JOBS = 400
RUN = "sweeps/a.pkl"

SLOW_JOB = """
    import sys, time
    from mpitasker_ext import mpimap
    def work(x):
        time.sleep(float(sys.argv[2]))
        print(f"job {x} says hi")
        if x == 7:
            raise ValueError('<img src=x onerror=alert(1)> seven')
        return x
    mpimap(work, range(int(sys.argv[1])), 'sweeps/a.pkl', progress=False)
"""


@pytest.fixture
def lab(tmp_path):
    """A real JupyterLab on the server root tmp_path/root, with its own workspace and settings directories so
    no layout from an earlier session (a collapsed sidebar, an open tab) changes what the browser sees."""
    root = tmp_path / "root"
    (root / "sweeps").mkdir(parents=True)
    yield from start_lab(tmp_path, root)


@pytest.fixture
def linked_lab(tmp_path):
    """A real JupyterLab whose root tmp_path/root is a symlink to tmp_path/real (a home directory reached
    through a link, as on many clusters)."""
    (tmp_path / "real" / "sweeps").mkdir(parents=True)
    os.symlink(tmp_path / "real", tmp_path / "root")
    yield from start_lab(tmp_path, tmp_path / "root")


def start_lab(tmp_path, root):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: the test command installs Debian's chromium (apt-get install chromium)")
    news = tmp_path / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text('{"fetchNews": "false"}')            # no news toast over the panel (and no request out)
    port, token = free_port(), "l" + os.urandom(8).hex()
    log_path = tmp_path / "lab.log"
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                             "--allow-root", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
                             f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
                             f"--LabApp.user_settings_dir={tmp_path / 'settings'}"],
                            stdout=subprocess.DEVNULL, stderr=open(log_path, "w"))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_jupyter(base, token, proc, log_path)
        yield base, token, root
    finally:
        proc.terminate()
        proc.wait(15)


def test_the_install_enables_the_prebuilt_extension():
    out = subprocess.run([os.path.join(BIN, "jupyter"), "labextension", "list"], capture_output=True, text=True,
                         timeout=60)
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)
    line = next((ln for ln in text.splitlines() if "mpitasker-ext" in ln), "")
    assert "enabled" in line and "OK" in line and "(python, mpitasker_ext)" in line, text


def test_panel_lists_a_running_run_and_opens_it_in_a_tab(lab, runner):
    from playwright.sync_api import sync_playwright
    base, token, root = lab
    api_calls, dialogs = [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        page.on("request", lambda r: "/mpitasker/api/" in r.url and api_calls.append(r))
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(f"{base}/lab?token={token}")
        page.locator(".jp-LauncherCard", has_text="MPI runs").click(timeout=90000)   # the launcher item
        panel = page.locator("#mpitasker-runs")
        panel.wait_for(state="visible")
        assert panel.locator(".mpitasker-heading").inner_text() == "MPI runs"
        page.wait_for_selector("#mpitasker-runs .mpitasker-status:text-matches('no runs under')")

        proc = start_run(runner, root, JOBS, 0.1)      # ~20 s on 2 workers: time to watch it move
        try:
            row = panel.locator(f".mpitasker-run[data-path='{RUN}']")
            counts = row.locator(".mpitasker-counts")
            seen = watch_counts(counts, moves=4, timeout=60)
            assert row.locator(".mpitasker-state").inner_text() == "running"
            assert re.fullmatch(r"[\d.]+ jobs/s", row.locator(".mpitasker-rate").inner_text())
            assert re.fullmatch(r"ETA (\d+:\d\d:\d\d|\?)", row.locator(".mpitasker-eta").inner_text())
            done_width = width(row.locator(".mpitasker-bar-done"))
            assert 0 < done_width < 100 and width(row.locator(".mpitasker-bar-failed")) > 0

            # hidden: the collapsed panel asks nothing; shown again (from the command palette): it polls again
            page.locator(".jp-SideBar .lm-TabBar-tab[data-id='mpitasker-runs']").click()
            panel.wait_for(state="hidden")
            page.wait_for_timeout(500)             # (Playwright delivers request events while it waits)
            hidden_from = len(api_calls)
            page.wait_for_timeout(3000)
            while_hidden = [r.url for r in api_calls[hidden_from:]]
            page.keyboard.press("Control+Shift+C")
            page.locator(".lm-CommandPalette-input").fill("Show MPI runs")
            page.keyboard.press("Enter")
            panel.wait_for(state="visible")
            shown_from = len(api_calls)
            page.wait_for_timeout(2500)
            while_shown = api_calls[shown_from:]

            row.click()
            view = page.locator(f".mpitasker-runview[data-path='{RUN}']")
            view.wait_for(state="visible")
            tab = page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab", has_text="a.pkl")
            assert "lm-mod-current" in tab.get_attribute("class")
            view.locator(".mpitasker-ranks tbody tr").first.wait_for()
            ranks = view.locator(".mpitasker-ranks tbody tr td:first-child").all_inner_texts()
            failure = view.locator("details.mpitasker-failure[data-index='7']")
            failure.locator("summary").click()
            traceback = failure.locator("pre.mpitasker-traceback").inner_text()
            failure_output = failure.locator(".mpitasker-output pre").inner_text()
            lookup = view.locator("form.mpitasker-job-lookup")      # any job's output, asked for by its number
            lookup.locator("input.mpitasker-job-index").fill("3")
            lookup.locator("button", has_text="Show").click()
            job_output = lookup.locator("pre.mpitasker-job-output")
            job_output.wait_for(state="visible")
            job3 = job_output.inner_text()
            os.makedirs(ARTIFACTS, exist_ok=True)
            page.screenshot(path=os.path.join(ARTIFACTS, "lab-panel.png"))
            view_counts = watch_counts(view.locator(".mpitasker-counts"), moves=2, timeout=30)
            lookup.locator("input.mpitasker-job-index").fill(str(JOBS + 5))
            lookup.locator("input.mpitasker-job-index").press("Enter")
            lookup.locator(".mpitasker-job-message.mpitasker-job-error").wait_for()
            beyond = (lookup.locator(".mpitasker-job-message").inner_text(), job_output.is_hidden())

            proc.wait(120)
            page.wait_for_selector(f"#mpitasker-runs .mpitasker-run[data-path='{RUN}'] "
                                   ".mpitasker-state:text-is('failed')", timeout=30000)
            final = (counts.get_attribute("data-done"), counts.get_attribute("data-total"), counts.inner_text())

            # a link naming the run (as the %%mpimap widget renders one, with the run's absolute path) reopens it
            tab.locator(".lm-TabBar-tabCloseIcon").click()
            view.wait_for(state="detached")
            page.evaluate("""path => { const a = document.createElement('a'); a.textContent = 'open the run';
                a.href = '/mpitasker/run/sweeps/a.pkl'; a.dataset.mpitaskerRun = path; a.id = 'run-link';
                a.style.cssText = 'position: fixed; left: 400px; bottom: 60px; z-index: 10000';
                document.body.append(a); }""", str(root / RUN))
            page.locator("#run-link").click()
            view.wait_for(state="visible")
            reopened = page.url
        finally:
            if proc.poll() is None:
                proc.kill()
            browser.close()
    assert all(total == JOBS for _, total in seen)
    done = [d for d, _ in seen]
    assert done == sorted(done) and len(set(done)) >= 4, f"the panel's counts did not move: {seen}"
    assert while_hidden == [], f"the hidden panel still polled: {while_hidden}"
    assert len(while_shown) >= 2, "the panel did not poll again once shown"
    assert all(r.method == "GET" and r.headers.get("authorization", "").startswith("token ") for r in while_shown)
    assert ranks == ["1", "2"], ranks
    assert "<img src=x onerror=alert(1)> seven" in traceback and dialogs == []    # shown as text, never run
    assert failure_output.strip() == "job 7 says hi" and job3.strip() == "job 3 says hi", (failure_output, job3)
    assert f"job {JOBS + 5} is out of range" in beyond[0] and f"{JOBS} jobs" in beyond[0] and beyond[1], beyond
    assert [d for d, _ in view_counts] == sorted(d for d, _ in view_counts) and len(view_counts) >= 2
    assert final == (str(JOBS - 1), str(JOBS), f"{JOBS - 1}/{JOBS}")
    assert reopened.startswith(f"{base}/lab")                # the link opened the tab, not the standalone page


MARKUP = "<img src=x onerror=window.__pwned=1>"


def plant(root, name, **status):
    """A run directory with a status file, as anyone who can write under the root may leave one."""
    os.makedirs(root / f"{name}.mpi")
    (root / f"{name}.mpi" / "status.json").write_text(json.dumps(status))


def test_links_resolve_through_the_server_and_planted_runs_stay_text(linked_lab):
    """The root is reached through a symlink, and an output named through it (`-o ~/sweeps/e.pkl` with a linked
    home) is not under the root's real path as a string: the link must still open that run, not a tab with a
    404. A link to a path outside the root says so. A run in the "error" state is coloured as one. Planted
    markup in a run's name, error, traceback and output shows as text in the panel and the tab."""
    from playwright.sync_api import sync_playwright
    base, token, root = linked_lab
    requested = []
    plant(root, "sweeps/e", state="error", total=6, done=2, failed=0)
    plant(root, f"sweeps/{MARKUP}", state="failed", total=3, done=2, failed=1,
          failures=[{"index": 1, "error": MARKUP, "traceback": f"</pre>{MARKUP}", "output": MARKUP}])
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.on("request", lambda r: requested.append(r.url))
            page.goto(f"{base}/lab?token={token}")
            page.locator(".jp-LauncherCard", has_text="MPI runs").click(timeout=90000)
            panel = page.locator("#mpitasker-runs")
            error_row = panel.locator(".mpitasker-run[data-path='sweeps/e']")
            error_row.wait_for()
            error_class = error_row.locator(".mpitasker-state").get_attribute("class")
            markup_row = panel.locator(".mpitasker-run", has_text=MARKUP)
            markup_row.wait_for()
            markup_row.click()
            view = page.locator(".mpitasker-runview", has_text="Failures")
            view.locator("details.mpitasker-failure summary").click()
            failure = view.locator("details.mpitasker-failure")
            shown = (failure.locator("summary").inner_text(), failure.locator("pre.mpitasker-traceback").inner_text(),
                     failure.locator(".mpitasker-output pre").inner_text())

            page.evaluate("""path => { const a = document.createElement('a'); a.textContent = 'open the run';
                a.href = '#'; a.dataset.mpitaskerRun = path; a.id = 'run-link';
                a.style.cssText = 'position: fixed; left: 400px; bottom: 60px; z-index: 10000';
                document.body.append(a); }""", str(root / "sweeps" / "e"))
            page.locator("#run-link").click()
            linked = page.locator(".mpitasker-runview[data-path='sweeps/e']")
            linked.wait_for(state="visible")
            linked.locator(".mpitasker-counts[data-total='6']").wait_for()
            linked_error = linked.locator(".mpitasker-error").is_visible()

            page.evaluate("""() => { document.getElementById('run-link').dataset.mpitaskerRun = '/etc/x.pkl'; }""")
            page.locator("#run-link").click()
            dialog = page.locator(".jp-Dialog")
            dialog.wait_for()
            refusal = dialog.inner_text()
            dialog.locator("button").last.click()
            dialog.wait_for(state="detached")

            # a relative name with '..' is no run: a URL would resolve it into another route of the server
            page.evaluate("""() => { document.getElementById('run-link').dataset.mpitaskerRun =
                '../../../lab/api/not-a-run'; }""")
            page.locator("#run-link").click()
            dialog.wait_for()
            dotted = dialog.inner_text()
            page.wait_for_timeout(1500)
            tabs = page.locator(".mpitasker-runview").evaluate_all("views => views.map(v => v.dataset.path)")
            pwned, images = page.evaluate("window.__pwned"), page.locator("img[src=x]").count()
        finally:
            browser.close()
    assert "mpitasker-state-error" in error_class, error_class
    assert shown == (f"job 1: {MARKUP}", f"</pre>{MARKUP}", MARKUP)
    assert not linked_error
    assert "/etc/x.pkl" in refusal and "not under" in refusal, refusal
    assert "/etc/x.pkl" not in tabs and "etc/x.pkl" not in tabs, tabs
    assert "not a run" in dotted and not any("/lab/api/not-a-run" in url for url in requested), dotted
    assert pwned is None and images == 0


def start_run(runner, root, jobs, delay):
    runner.workdir = str(root)
    runner.write("job.py", SLOW_JOB)
    return subprocess.Popen(runner.command("job.py", 3, jobs, delay), cwd=str(root),
                            env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def watch_counts(counts, moves, timeout):
    """The (done, total) a counts element shows, each change once, until it changed `moves` times."""
    seen = []
    deadline = time.time() + timeout
    while time.time() < deadline and len(seen) < moves:
        if counts.count():
            value = (int(counts.get_attribute("data-done")), int(counts.get_attribute("data-total")))
            if not seen or seen[-1] != value:
                seen.append(value)
        time.sleep(0.2)
    assert len(seen) >= moves, f"the counts did not move: {seen}"
    return seen


def width(locator):
    """A bar segment's width in percent of its bar."""
    return locator.evaluate("el => 100 * el.getBoundingClientRect().width / el.parentElement.clientWidth")
