"""Whole notebooks in real kernels: the example notebooks, and an interrupted cell that resumes."""

import os
import shutil
import subprocess
import sys
import time

import nbformat
import pytest
from jupyter_client.manager import start_new_kernel
from nbclient import NotebookClient

from conftest import BIN, CLUSTER_PROFILE, REPO, seed_load

EXAMPLES = os.path.join(REPO, "examples")


def execute(path, workdir, timeout=300):
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": workdir}}).execute()
    return nb


def outputs(nb):
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text.append(out.get("text", "") or str(out.get("data", {}).get("text/plain", "")))
    return "\n".join(text)


def test_quickstart_notebook_starts_its_own_cluster_and_reuses_the_cache(tmp_path):
    nb = execute(os.path.join(EXAMPLES, "quickstart.ipynb"), str(tmp_path))
    text = outputs(nb)
    assert "started cluster" in text and "4 MPI engines" in text
    assert "20 results in" in text and "3 MPI workers" in text
    assert "omega=1.00 gamma=0.00" in text
    stop = [out.get("text", "") for out in nb.cells[-1].outputs]        # the cell ending in %mpicluster stop
    assert len(stop) == 1 and len(stop[0].splitlines()) == 1 and "stopped" in stop[0], stop
    assert "exit_code" not in text and "Output for" not in text
    triples = seed_load(tmp_path / "quickstart.pkl")
    assert len(triples) == 20 and triples[0][1] == [(0.5, 0.0)]


def test_parameter_sweep_notebook_on_the_running_cluster(tmp_path, mpi_cluster):
    path = tmp_path / "sweep.ipynb"
    source = open(os.path.join(EXAMPLES, "parameter_sweep.ipynb")).read()
    path.write_text(source.replace("%mpicluster status", f"%mpicluster status --profile {CLUSTER_PROFILE}"))
    nb = execute(str(path), str(tmp_path))
    text = outputs(nb)
    assert "4 engines in one MPI world" in text and "63 results in" in text
    assert "{0.1: 10.0," in text


def test_failed_jobs_in_a_notebook_keep_the_count_the_spelling_and_a_proportional_bar(tmp_path, mpi_cluster):
    """3 of 180 jobs fail: JobsFailed carries the map's size, the advice uses the magic's options, and the
    widget's bar is mostly green with a sliver of red."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("%load_ext mpitasker_ext"),
                nbformat.v4.new_code_cell(f"%%mpimap --profile {CLUSTER_PROFILE} fails.pkl for x in range(180)\n"
                                          "if x in (5, 60, 120):\n    raise ValueError(f'bad {x}')\nx"),
                nbformat.v4.new_code_cell("import sys\nerr = sys.last_value\n"
                                          "print(type(err).__name__, err.total, err.indices)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    [error] = [out for out in nb.cells[1].outputs if out.output_type == "error"]
    shown = "\n".join(error.traceback)
    assert error.ename == "JobsFailed" and error.evalue.startswith("3 of 180 jobs failed: indices 5, 60, 120")
    assert "--retries N" in shown and "retries=N" not in shown and "magics.py" not in shown
    assert "".join(out.get("text", "") for out in nb.cells[2].outputs) == "JobsFailed 180 [5, 60, 120]\n"
    states = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"].values()
    [bar] = [m["state"]["value"] for m in states if "mpitasker-bar'" in str(m["state"].get("value", ""))]
    assert "class='mpitasker-bar-done' data-fraction='0.983333'" in bar
    assert "class='mpitasker-bar-failed' data-fraction='0.016667'" in bar


def test_printing_jobs_never_flood_a_cell_and_their_output_is_kept(tmp_path, mpi_cluster):
    """10,000 jobs that print make no line in the cell; %mpistatus --job N shows one job's text; a failed job's
    output is in the error, in JobsFailed.failures and in the widget's failure entry. The serial run in the
    kernel does not print per job either."""
    code = [
        "%load_ext mpitasker_ext",
        f"%%mpimap --profile {CLUSTER_PROFILE} talk.pkl for x in range(10000)\nprint(f'job {{x}} says hi')\nx",
        "%mpistatus talk.pkl --job 5",
        f"%%mpimap --profile {CLUSTER_PROFILE} bad.pkl for x in range(20)\nprint(f'checking {{x}}')\n"
        "if x == 13:\n    print('<b>about to fail</b>')\n    raise ValueError('thirteen')\nx",
        "import sys\nprint(sys.last_value.failures[13])",
        "%%mpimap here.pkl for x in range(300)\nprint(f'serial {x} says hi')\nx",
        "%mpistatus here.pkl --job 299",
    ]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in code]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    def text(cell):
        return "".join(out.get("text", "") for out in nb.cells[cell].outputs if out.output_type == "stream")

    assert "says hi" not in text(1) and "10000 results in" in text(1) and len(text(1).splitlines()) < 5
    assert text(2) == "job 5 says hi\n"
    [error] = [out for out in nb.cells[3].outputs if out.output_type == "error"]
    shown = "\n".join(error.traceback)
    assert error.ename == "JobsFailed" and "checking" not in text(3)
    assert "output of job 13 (last lines):\nchecking 13\n<b>about to fail</b>\n" in shown
    assert text(4).endswith("output of job 13:\nchecking 13\n<b>about to fail</b>\n\n")
    states = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"].values()
    entries = [m["state"]["value"] for m in states if "output of job 13" in str(m["state"].get("value", ""))]
    assert entries and "checking 13\n&lt;b&gt;about to fail&lt;/b&gt;" in entries[0]
    assert "says hi" not in text(5) and "300 results in" in text(5)
    assert text(6) == "serial 299 says hi\n"


@pytest.fixture
def kernel(tmp_path):
    km, kc = start_new_kernel(kernel_name="python3", cwd=str(tmp_path))
    kc.manager = km
    yield kc
    kc.stop_channels()
    km.shutdown_kernel(now=True)


def run(kc, code, timeout=120):
    """Execute code in the kernel; return (status, text of stream and error outputs)."""
    msg_id = kc.execute(code)
    chunks, status = [], None
    deadline = time.time() + timeout
    while time.time() < deadline:
        msg = kc.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            chunks.append(content["text"])
        elif kind == "error":
            chunks.append(f"{content['ename']}: {content['evalue']}")
            status = "error"
        elif kind == "status" and content["execution_state"] == "idle":
            break
    return status or "ok", "".join(chunks)


def test_interrupted_cell_stops_the_engines_and_resumes(kernel, tmp_path, mpi_cluster):
    assert run(kernel, "%load_ext mpitasker_ext")[0] == "ok"
    cell = (f"%%mpimap --profile {CLUSTER_PROFILE} -o out slow.pkl for x in range(60)\n"
            "import time\ntime.sleep(0.1)\n"
            "with open('exec.log', 'a') as f:\n    f.write(f'{x}\\n')\nx * 2\n")
    msg_id = kernel.execute(cell)
    log = tmp_path / "exec.log"
    deadline = time.time() + 60
    while (not log.exists() or len(log.read_text().split()) < 12) and time.time() < deadline:
        time.sleep(0.05)
    interrupted_at = time.time()
    kernel.manager.interrupt_kernel()
    status, text = collect(kernel, msg_id)
    assert status == "error" and "interrupted" in text and "Run the cell again to resume" in text
    assert time.time() - interrupted_at < 5, "the engines did not stop within 5 s"
    done_before = set(map(int, log.read_text().split()))
    assert 12 <= len(done_before) < 60
    status, text = run(kernel, cell)
    assert status == "ok", text
    runs = list(map(int, log.read_text().split()))
    assert sorted(set(runs)) == list(range(60))
    assert len(runs) - 60 <= 3, "more than the jobs in flight at the interrupt ran twice"
    assert run(kernel, "assert out == [2 * x for x in range(60)]")[0] == "ok"


def collect(kc, msg_id, timeout=60):
    chunks, status = [], "ok"
    while True:
        msg = kc.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            chunks.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            chunks.append(f"{msg['content']['ename']}: {msg['content']['evalue']}")
            status = "error"
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return status, "".join(chunks)


def test_engines_that_are_not_one_mpi_world_are_refused(tmp_path):
    """Two engines started without MPI each see a world of size 1: %%mpimap must refuse, not run twice."""
    ipcluster = os.path.join(BIN, "ipcluster")
    profile = "nompi"
    subprocess.run([ipcluster, "start", "-n=2", "--daemonize", f"--profile={profile}"], check=True,
                   capture_output=True, timeout=120)
    try:
        import ipyparallel as ipp
        client = ipp.Client(profile=profile, timeout=60)
        client.wait_for_engines(2, timeout=120)
        client.close()
        code = (f"import os; os.chdir({str(tmp_path)!r})\n"
                "from IPython.core.interactiveshell import InteractiveShell\n"
                "ip = InteractiveShell.instance(); ip.run_line_magic('load_ext', 'mpitasker_ext')\n"
                "from mpitasker_ext.errors import ClusterError\n"
                "try:\n"
                f"    ip.run_cell_magic('mpimap', '--profile {profile} o.pkl for x in range(4)', 'x')\n"
                "except ClusterError as exc:\n"
                "    print('REFUSED', exc)\n")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert "REFUSED" in proc.stdout and "not one MPI world" in proc.stdout, proc.stdout + proc.stderr
        assert "ipcluster start --engines=MPI" in proc.stdout
        assert not os.path.exists(tmp_path / "o.pkl")
    finally:
        subprocess.run([ipcluster, "stop", f"--profile={profile}"], capture_output=True, timeout=120)
        shutil.rmtree(tmp_path / "o.pkl.mpi", ignore_errors=True)


def test_a_dying_engine_is_reported_with_the_jobs_it_ran(tmp_path, monkeypatch):
    """MPI stops every engine when one dies: the magic says so, names the running jobs, keeps the work."""
    import signal

    from IPython.core.interactiveshell import InteractiveShell

    from mpitasker_ext.errors import EnginesDied
    ipcluster = os.path.join(BIN, "ipcluster")
    profile = "doomed"
    subprocess.run([ipcluster, "start", "--engines=MPI", "-n=4", "--daemonize", f"--profile={profile}"],
                   check=True, capture_output=True, timeout=120)
    try:
        import ipyparallel as ipp
        client = ipp.Client(profile=profile, timeout=60)
        client.wait_for_engines(4, timeout=120)
        pids = client[:].apply_sync(os.getpid)
        client.close()
        monkeypatch.chdir(tmp_path)
        ip = InteractiveShell.instance()
        ip.run_line_magic("load_ext", "mpitasker_ext")
        # jobs of 0.5 s: a worker is between two jobs (and so runs none) for a few ms in 500
        handle = ip.run_cell_magic("mpimap", f"--profile {profile} --no-wait d.pkl for x in range(60)",
                                   "import time\ntime.sleep(0.5)\nx")
        log_dir = tmp_path / "d.pkl.mpi"
        deadline = time.time() + 30
        while time.time() < deadline and len(list(log_dir.glob("journal-*"))) < 3:
            time.sleep(0.05)
        time.sleep(0.7)
        os.kill(pids[2], signal.SIGKILL)
        with pytest.raises(EnginesDied) as info:
            handle.result(timeout=60)
        message = str(info.value)
        assert "MPI engines died during the run" in message and "Restart the cluster" in message
        assert f"pid {pids[2]})" in message and "finished jobs are kept in" in message
        assert (tmp_path / "d.pkl.mpi").is_dir() and not (tmp_path / "d.pkl").exists()
    finally:
        subprocess.run([ipcluster, "stop", f"--profile={profile}"], capture_output=True, timeout=120)


def test_live_function_sees_the_curve_fill_in_and_partial_reads_a_no_wait_run(tmp_path, mpi_cluster):
    """--live draw is called with growing, correct parts of the run and last with every result; a --no-wait
    handle's partial() grows too and ends equal to the results."""
    cells = [
        "%load_ext mpitasker_ext",
        "calls = []\ndef draw(args, results):\n    calls.append((list(args), list(results)))",
        f"%%mpimap --profile {CLUSTER_PROFILE} --live draw -o curve curve.pkl for w in range(60)\n"
        "import time\ntime.sleep(0.15)\nw * w",
        "sizes = [len(a) for a, _ in calls]\n"
        "assert all(r == [a * a for a in args] for args, r in calls)\n"
        "assert sizes == sorted(sizes) and len(set(sizes)) >= 3 and sizes[-1] == 60, sizes\n"
        "assert calls[-1] == (list(range(60)), [w * w for w in range(60)])\n"
        "print('LIVE OK', len(calls))",
        f"%%mpimap --profile {CLUSTER_PROFILE} --no-wait -o later later.pkl for w in range(40)\n"
        "import time\ntime.sleep(0.1)\n-w",
        "import time\nseen = []\nwhile not _.done():\n    part = _.partial()\n    seen.append(len(part))\n"
        "    assert all(v == -i for i, v in part.items())\n    time.sleep(0.1)\n"
        "_.wait()\nassert seen == sorted(seen) and len(set(seen)) >= 3, seen\n"
        "assert _.partial() == {i: -i for i in range(40)}\nprint('PARTIAL OK')",
    ]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = outputs(nb)
    assert "LIVE OK" in text and "PARTIAL OK" in text


def test_stop_naming_a_cluster_stops_that_one_and_keeps_the_kernels_own(tmp_path):
    """`%mpicluster stop --cluster-id B` in a kernel that had started a cluster of its own stopped its own
    (and said so), left B running, and dropped the kernel's engines: the cluster named is the one stopped. Its
    own is the one named by its profile (ipyparallel's '' is 'default')."""
    import ipyparallel as ipp

    other = "other-" + os.urandom(4).hex()
    ipcluster = os.path.join(BIN, "ipcluster")
    subprocess.run([ipcluster, "start", "--engines=MPI", "-n=2", "--daemonize", f"--cluster-id={other}"],
                   check=True, capture_output=True, timeout=120)
    try:
        client = ipp.Client(cluster_id=other, timeout=60)
        client.wait_for_engines(2, timeout=120)
        client.close()
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in (
            "%load_ext mpitasker_ext\n%mpicluster start -n 2", f"%mpicluster stop --cluster-id {other}",
            "%mpicluster status", "%mpicluster stop --profile default")])
        NotebookClient(nb, timeout=240, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        subprocess.run([ipcluster, "stop", f"--cluster-id={other}"], capture_output=True, timeout=120)
    text = ["".join(out.get("text", "") for out in cell.outputs) for cell in nb.cells]
    own = text[0].split("'")[1]
    assert own != other and text[1] == f"cluster '{other}' stopped\n", text
    with pytest.raises(FileNotFoundError):
        ipp.Cluster.from_file(cluster_id=other)
    assert text[2].startswith("2 engines in one MPI world"), text
    assert text[3] == f"cluster '{own}' stopped\n", text
