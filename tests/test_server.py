"""The server extension against a real `jupyter server`: authentication, confinement to the root, the JSON
during and after a real MPI run, and a real browser watching the dashboard move."""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from conftest import BIN, CHROMIUM, CHROMIUM_ARGS, REPO, free_port, wait_for_jupyter

ARTIFACTS = os.path.join(REPO, "test-artifacts")

SLOW_JOB = """
    import sys, time
    from mpitasker_ext import mpimap
    def work(x):
        time.sleep(float(sys.argv[2]))
        if x == 7:
            print('<b>checked</b> job', x)
            raise ValueError('<script>alert(1)</script> seven')
        return x
    mpimap(work, range(int(sys.argv[1])), 'sweeps/a.pkl', progress=False)
"""


class Server:
    def __init__(self, root, *extra):
        self.root = root
        self.port = free_port()
        self.token = "s" + os.urandom(8).hex()
        self.base = f"http://127.0.0.1:{self.port}"
        log_path = root.parent / f"server-{self.port}.log"
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "jupyter_server", "--no-browser", "--ip=127.0.0.1",
                                      f"--port={self.port}", "--allow-root", f"--IdentityProvider.token={self.token}",
                                      f"--ServerApp.root_dir={root}", *extra], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(root.parent)))
        wait_for_jupyter(self.base, self.token, self.proc, log_path)

    def get(self, path, token=True, raw=False):
        """(status, body) of a GET; the path is sent exactly as given."""
        request = urllib.request.Request(self.base + path)
        if token:
            request.add_header("Authorization", f"token {self.token}")
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(request, timeout=10) as response:
                body = response.read().decode()
                return response.status, body if raw else _maybe_json(body)
        except urllib.error.HTTPError as exc:
            body = exc.read().decode()
            return exc.code, body if raw else _maybe_json(body)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(15)
        self.log.close()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _maybe_json(body):
    try:
        return json.loads(body)
    except ValueError:
        return body


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "root"
    (root / "sweeps").mkdir(parents=True)
    srv = Server(root)
    yield srv
    srv.stop()


def start_run(runner, server, jobs, delay):
    runner.workdir = str(server.root)
    runner.write("job.py", SLOW_JOB)
    return runner.start("job.py", 3, jobs, delay)


def test_extension_is_enabled_by_the_install():
    out = subprocess.run([os.path.join(BIN, "jupyter"), "server", "extension", "list"], capture_output=True,
                         text=True, timeout=60)
    text = out.stdout + out.stderr
    assert "mpitasker_ext" in text and "enabled" in text.split("mpitasker_ext", 1)[1][:80]


def test_every_route_needs_authentication(server):
    for path in ("/mpitasker/", "/mpitasker/api/runs", "/mpitasker/run/sweeps/a.pkl", "/mpitasker/api/run/x.pkl",
                 "/mpitasker/api/output/x.pkl?job=0"):
        status, _ = server.get(path, token=False)
        assert status in (302, 403), (path, status)
    status, body = server.get("/mpitasker/api/runs")
    assert status == 200 and body["runs"] == []


@pytest.mark.parametrize("path", [
    "/mpitasker/api/run/..%2F..%2Fetc%2Fpasswd",
    "/mpitasker/api/run/../../etc/passwd",
    "/mpitasker/run/..%2F..%2F..%2Fetc%2Fpasswd",
    "/mpitasker/api/run/%2Fetc%2Fpasswd",
    "/mpitasker/api/run//etc/passwd",
    "/mpitasker/api/run/sweeps/..%2F..%2Fsecret",
    "/mpitasker/api/run/outside/x.pkl",
    "/mpitasker/..%2F..%2F..%2Fetc%2Fpasswd",
    "/mpitasker/api/output/..%2Fx.pkl?job=0",
    "/mpitasker/api/output/../x.pkl?job=0",
    "/mpitasker/api/output/%2Fetc%2Fpasswd?job=0",
    "/mpitasker/api/output/outside/x.pkl?job=0",
    "/mpitasker/api/output/outside?job=0",
])
def test_paths_outside_the_root_are_refused(server, tmp_path, path):
    secret = tmp_path / "secret"
    (secret.parent / "secret.mpi").mkdir()
    (secret.parent / "secret.mpi" / "status.json").write_text(json.dumps({"state": "running", "total": 1}))
    os.symlink(tmp_path, server.root / "outside")             # a symlink pointing out of the root
    (tmp_path / "x.pkl.mpi").mkdir()
    (tmp_path / "x.pkl.mpi" / "status.json").write_text(json.dumps({"state": "running", "total": 9}))
    status, body = server.get(path)
    assert status in (400, 403, 404), (status, body)
    assert "root:x:0" not in str(body) and '"total": 9' not in str(body)


def test_the_widget_link_leads_to_the_run_page_only_under_the_root(server, tmp_path):
    """A kernel knows its output's absolute path, not the server's root: mpitasker/open?path= redirects to the
    run's page when the path lies under the root, and refuses everything else."""
    from urllib.parse import quote
    for where in (server.root / "sweeps" / "a.pkl", tmp_path / "x.pkl"):
        os.makedirs(f"{where}.mpi")
        with open(f"{where}.mpi/status.json", "w") as f:
            json.dump({"state": "running", "total": 9}, f)
    os.symlink(tmp_path, server.root / "outside")
    request = urllib.request.Request(server.base + "/mpitasker/open?path=" + quote(str(server.root / "sweeps/a.pkl")),
                                     headers={"Authorization": f"token {server.token}"})
    try:
        urllib.request.build_opener(_NoRedirect).open(request, timeout=10)
        raise AssertionError("no redirect")
    except urllib.error.HTTPError as exc:
        assert exc.code == 302 and exc.headers["Location"].endswith("/mpitasker/run/sweeps/a.pkl"), exc.headers
    for path in (str(tmp_path / "x.pkl"), str(server.root / "outside" / "x.pkl"), "sweeps/a.pkl",
                 str(server.root / "sweeps" / ".." / ".." / "x.pkl"), "/etc/passwd", ""):
        status, body = server.get("/mpitasker/open?path=" + quote(path))
        assert status == 404, (path, status)
    status, _ = server.get("/mpitasker/open?path=" + quote(str(server.root / "sweeps" / "a.pkl")), token=False)
    assert status in (302, 403) and status != 200
    # the Lab extension's question: the same rule, answered as JSON, real paths compared (a linked directory)
    os.symlink(server.root / "sweeps", server.root / "linked")
    for path in (server.root / "sweeps" / "a.pkl", server.root / "linked" / "a.pkl"):
        assert server.get("/mpitasker/api/open?path=" + quote(str(path))) == (200, {"path": "sweeps/a.pkl"})
    for path in (str(tmp_path / "x.pkl"), str(server.root / "outside" / "x.pkl"), "sweeps/a.pkl", ""):
        assert server.get("/mpitasker/api/open?path=" + quote(path))[0] == 404, path
    assert server.get("/mpitasker/api/open?path=" + quote(str(server.root / "sweeps" / "a.pkl")), token=False)[0] == 403


def test_json_during_and_after_a_real_run(server, runner):
    proc = start_run(runner, server, 60, 0.05)
    seen = []
    deadline = time.time() + 60
    while time.time() < deadline:
        status, body = server.get("/mpitasker/api/runs")
        assert status == 200
        runs = [r for r in body["runs"] if r["path"] == "sweeps/a.pkl"]
        if runs:
            seen.append((runs[0]["state"], runs[0]["done"]))
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.wait(30)
    running = [d for s, d in seen if s == "running"]
    assert len(set(running)) >= 3 and running == sorted(running)
    status, run = server.get("/mpitasker/api/run/sweeps/a.pkl")
    assert status == 200 and run["state"] == "failed" and run["done"] == 59 and run["failed"] == 1
    assert run["failures"][0]["index"] == 7 and "seven" in run["failures"][0]["traceback"]
    assert run["failures"][0]["output"] == "<b>checked</b> job 7\n"
    assert [r["rank"] for r in run["ranks"]] == [1, 2] and run["total"] == 60
    page_status, page = server.get("/mpitasker/run/sweeps/a.pkl", raw=True)
    assert page_status == 200 and "<script>alert(1)" not in page
    # fix the job and finish: the directory goes away, the run shows as finished
    (server.root / "job.py").write_text((server.root / "job.py").read_text().replace("x == 7", "x == -1"))
    subprocess.run(runner.command("job.py", 3, 60, 0.0), cwd=str(server.root), env=dict(os.environ, PYTHONPATH=REPO),
                   capture_output=True, timeout=120, check=True)
    assert not (server.root / "sweeps" / "a.pkl.mpi").exists()
    status, body = server.get("/mpitasker/api/runs")
    finished = [r for r in body["runs"] if r["path"] == "sweeps/a.pkl"]
    assert finished and finished[0]["state"] == "finished" and finished[0]["done"] == 60


def test_the_server_never_writes(server, runner):
    proc = start_run(runner, server, 20, 0.01)
    proc.wait(60)
    before = {p: os.stat(p).st_mtime_ns for p in map(str, server.root.rglob("*"))}
    for path in ("/mpitasker/", "/mpitasker/api/runs", "/mpitasker/api/run/sweeps/a.pkl",
                 "/mpitasker/run/sweeps/a.pkl", "/mpitasker/api/output/sweeps/a.pkl?job=7",
                 "/mpitasker/api/output/sweeps/a.pkl?job=99"):
        server.get(path)
    after = {p: os.stat(p).st_mtime_ns for p in map(str, server.root.rglob("*"))}
    assert before == after
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        request = urllib.request.Request(server.base + "/mpitasker/api/run/sweeps/a.pkl", method=method, data=b"{}",
                                         headers={"Authorization": f"token {server.token}"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=10)
        assert info.value.code == 405


def test_browser_sees_the_dashboard_move(server, runner):
    from playwright.sync_api import sync_playwright
    proc = start_run(runner, server, 300, 0.05)
    values = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 420})
        page.goto(f"{server.base}/mpitasker/?token={server.token}")
        deadline = time.time() + 90
        while time.time() < deadline:
            cell = page.locator("tr.run[data-path='sweeps/a.pkl'] td.counts")
            if cell.count():
                done = int(cell.first.get_attribute("data-done"))
                if not values or values[-1] != done:
                    values.append(done)
                if len(values) == 4:
                    os.makedirs(ARTIFACTS, exist_ok=True)
                    page.screenshot(path=os.path.join(ARTIFACTS, "dashboard.png"))
                state = page.locator("tr.run[data-path='sweeps/a.pkl'] td.state").first.inner_text()
                if state == "failed":
                    break
            time.sleep(0.3)
        page.goto(f"{server.base}/mpitasker/run/sweeps/a.pkl?token={server.token}")
        page.wait_for_selector("details.failure")
        page.locator("details.failure summary").first.click()
        page.wait_for_selector("details.failure[open] pre")
        text = page.locator("details.failure pre").first.inner_text()
        printed = page.locator("details.failure pre.output").first.inner_text()
        page.screenshot(path=os.path.join(ARTIFACTS, "dashboard-run.png"))
        lookup = page.locator("#job-lookup")                  # any job's output, by its number
        lookup.locator("input").fill("7")
        lookup.locator("button").click()
        page.wait_for_selector("#job-lookup pre.job-output:not([hidden])")
        looked_up = lookup.locator("pre.job-output").inner_text()
        lookup.locator("input").fill("300")
        lookup.locator("button").click()
        page.wait_for_selector("#job-lookup .job-message.error")
        beyond = lookup.locator(".job-message").inner_text()
        browser.close()
    proc.wait(60)
    assert len(values) >= 3 and values == sorted(values), values
    assert values[-1] == 299
    assert "<script>alert(1)</script> seven" in text       # shown as text, not executed
    assert printed.strip() == "<b>checked</b> job 7"      # the job's output under its traceback, as text
    assert looked_up.strip() == "<b>checked</b> job 7" and "out of range" in beyond, (looked_up, beyond)


PRINTING_JOB = """
    from mpitasker_ext import mpimap
    def work(x):
        if x % 3 != 2:
            print(f'job {x} says hi')
        if x == 4 and FAIL:
            raise ValueError('four')
        return x
    FAIL = True
    mpimap(work, range(10), 'sweeps/p.pkl', progress=False)
"""


def test_any_jobs_output_one_at_a_time(server, runner):
    """api/output/<path>?job=N: what job N printed, from the run directory of a failed run and from the store of
    a finished one; the message of job_output for a job without a record; 400 for what is not a job number."""
    runner.workdir = str(server.root)
    runner.write("job.py", PRINTING_JOB)
    run = subprocess.run(runner.command("job.py", 3), cwd=str(server.root), env=dict(os.environ, PYTHONPATH=REPO),
                         capture_output=True, timeout=120)
    assert run.returncode != 0 and (server.root / "sweeps" / "p.pkl.mpi").is_dir()

    def output(job):
        return server.get("/mpitasker/api/output/sweeps/p.pkl?job=" + job)

    assert output("3") == (200, {"path": "sweeps/p.pkl", "job": 3, "output": "job 3 says hi\n"})
    assert output("2") == (200, {"path": "sweeps/p.pkl", "job": 2, "output": ""})
    assert output("4")[1]["output"] == "job 4 says hi\n"                    # the failed job's output
    status, body = output("10")
    assert status == 404 and "out of range" in body["message"] and "10 jobs" in body["message"], body
    for job in ("-1", "abc", "", "1.5", "+3", "3a", "0x3", "\u0663", "9" * 40):
        status, body = output(urllib.parse.quote(job))
        assert status == 400 and "job number" in body["message"], (job, status, body)
    assert server.get("/mpitasker/api/output/sweeps/p.pkl")[0] == 400
    status, body = server.get("/mpitasker/api/output/sweeps/none.pkl?job=0")
    assert status == 404 and "no run of" in body["message"], body
    status, body = server.get("/mpitasker/api/output/sweeps/100%25s%25d.pkl?job=0")     # a '%' in the message
    assert status == 404 and "100%s%d.pkl" in body["message"], body
    assert server.get("/mpitasker/api/output/sweeps/p.pkl.mpi?job=0")[0] == 404

    (server.root / "job.py").write_text((server.root / "job.py").read_text().replace("FAIL = True", "FAIL = False"))
    subprocess.run(runner.command("job.py", 3), cwd=str(server.root), env=dict(os.environ, PYTHONPATH=REPO),
                   capture_output=True, timeout=120, check=True)
    assert not (server.root / "sweeps" / "p.pkl.mpi").exists()            # finished: read through the store
    assert output("3") == (200, {"path": "sweeps/p.pkl", "job": 3, "output": "job 3 says hi\n"})
    assert output("4")[1]["output"] == "job 4 says hi\n" and output("8")[1]["output"] == ""
    status, body = output("12345678")
    assert status == 404 and "out of range" in body["message"], body


def shout(x):
    print("secret output", x)
    return x


def test_a_store_linked_from_outside_the_root_is_not_read(server, tmp_path):
    """The job records live in <output>.cache/ too: a store that is a symlink out of the root is refused."""
    from mpitasker_ext import job_output, mpimap
    mpimap(shout, range(3), str(tmp_path / "x.pkl"), comm=None, progress=False)
    os.remove(tmp_path / "x.pkl")
    assert job_output(tmp_path / "x.pkl", 1) == "secret output 1\n"
    os.symlink(tmp_path / "x.pkl.cache", server.root / "sweeps" / "b.pkl.cache")
    assert job_output(server.root / "sweeps" / "b.pkl", 1) == "secret output 1\n"   # what a server could leak
    status, body = server.get("/mpitasker/api/output/sweeps/b.pkl?job=1")
    assert status == 404 and "secret" not in str(body), body


DENYING_AUTHORIZER = """
from jupyter_server.auth.authorizer import Authorizer
class NoContents(Authorizer):
    def is_authorized(self, handler, user, action, resource):
        return resource != "contents"
"""


def test_the_servers_authorizer_decides(tmp_path):
    """Authentication is not enough: a user the configured authorizer denies `contents` reads gets 403."""
    root = tmp_path / "root"
    (root / "sweeps").mkdir(parents=True)
    (tmp_path / "denying.py").write_text(DENYING_AUTHORIZER)
    from mpitasker_ext import mpimap
    mpimap(abs, range(3), str(root / "sweeps" / "a.pkl"), comm=None, progress=False)
    server = Server(root, "--ServerApp.authorizer_class=denying.NoContents")
    try:
        codes = [server.get(path)[0] for path in ("/mpitasker/", "/mpitasker/api/runs", "/mpitasker/run/sweeps/a.pkl",
                                                  "/mpitasker/api/run/sweeps/a.pkl",
                                                  "/mpitasker/api/output/sweeps/a.pkl?job=1",
                                                  f"/mpitasker/api/open?path={root}/sweeps/a.pkl")]
        assert codes == [403, 403, 403, 403, 403, 403]
        assert server.get("/api/status")[0] == 200          # the same user, authenticated, elsewhere
    finally:
        server.stop()


def test_handlers_are_importable_and_the_index_is_safe_across_threads(tmp_path, monkeypatch):
    """Module-level handlers (importable for tests and other front ends); routes joined with url_path_join;
    RunIndex.paths() called from many executor threads while runs appear never fails."""
    import threading

    from mpitasker_ext import server as servermod
    routes = dict((handler, pattern) for pattern, handler in servermod.handlers("/base"))
    assert routes[servermod.RunsAPI] == "/base/mpitasker/api/runs"
    assert routes[servermod.RunPage] == "/base/mpitasker/run/(.+)"
    assert routes[servermod.OutputAPI] == "/base/mpitasker/api/output/(.+)"
    monkeypatch.setattr(servermod, "SCAN_TTL", 0.0)
    index = servermod.RunIndex(str(tmp_path))
    errors, stop = [], threading.Event()

    def read():
        while not stop.is_set():
            try:
                index.paths()
            except Exception as exc:  # noqa: BLE001 - any failure is what this test looks for
                errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(6)]
    for thread in readers:
        thread.start()
    for i in range(150):
        (tmp_path / f"r{i}.pkl.mpi").mkdir()
    stop.set()
    for thread in readers:
        thread.join()
    assert errors == [] and len(index.paths()) == 150


def test_a_root_of_slash_serves_the_runs_under_it(tmp_path):
    """`--ServerApp.root_dir=/` (a container's Jupyter): every real path lies under the root. The check added a
    second '/' to it ('//') and refused every run, so nothing was listed and no link resolved."""
    from mpitasker_ext.server import RunIndex
    run = os.path.realpath(tmp_path / "sweeps" / "a.pkl")
    os.makedirs(f"{run}.mpi")
    index = RunIndex("/")
    assert index.confined(run)
    assert index.resolve(run[1:]) == run and index.resolve_absolute(run) == run
    assert index.relative(run) == run[1:]
    assert index.resolve("../" + run[1:]) is None and index.resolve(run) is None
