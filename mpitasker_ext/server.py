"""Jupyter server extension: one page showing every run under the server's root, live, read-only.

Routes (under the server's base URL), all behind Jupyter's authentication:
  /mpitasker/                   HTML dashboard, refreshing itself from the JSON API
  /mpitasker/run/<path>         HTML page of one run, with its failures' tracebacks
  /mpitasker/open?path=ABS      redirect to the run page of an absolute output path (the widget's link)
  /mpitasker/api/runs           JSON: every run (the same model as the widget)
  /mpitasker/api/run/<path>     JSON: one run
  /mpitasker/api/open?path=ABS  JSON: {"path": that run's path relative to the root} (the Lab's links)
  /mpitasker/api/output/<path>?job=N   JSON: what job N of that run printed
``<path>`` is the run's output path relative to the root; anything that resolves outside the root (``..``,
absolute paths, symlinks) is refused. Nothing here writes, deletes or starts anything.
"""

import asyncio
import html
import json
import os
import re
import threading
import time
import urllib.parse

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.utils import url_path_join
from tornado import web

from . import progress as progressmod
from .capture import CUT_MARK, MAX_OUTPUT
from .errors import CacheError, UsageError
from .joboutput import job_output
from .rundir import META_SUFFIX, RUN_SUFFIX
from .status import MISSING
from .store import STORE_SUFFIX

SCAN_DEPTH = 4
SCAN_TTL = 1.0  # seconds a directory walk is reused: many browser tabs cost one walk
JOB_NUMBER = re.compile(r"[0-9]{1,18}")
# A record keeps at most MAX_OUTPUT characters plus its cut mark; a planted one may hold more, never sent whole.
OUTPUT_LIMIT = MAX_OUTPUT + len(CUT_MARK.format(10 ** 18))
_SEPARATORS = sorted({"/", os.sep, os.altsep or "/"})  # what divides a run's name into directories


class RunIndex:
    """Runs under a root: found by walking the tree (``*.mpi`` dirs, finished outputs with a ``.code.json``),
    plus every run seen earlier in this server's life, so a run that finished and lost its ``.mpi`` directory
    still shows as finished."""

    def __init__(self, root):
        self.root = os.path.realpath(root)
        self._seen = set()
        self._walked_at = 0.0
        self._walked = []
        self._lock = threading.Lock()  # paths() runs in executor threads, several requests at once

    def paths(self):
        """Every run to list; each is checked like ``resolve`` each time, since a walk lists symlinks (an
        ``x.mpi`` link, a ``.code.json`` link) and a path seen earlier may have become one since."""
        with self._lock:
            now = time.monotonic()
            if now - self._walked_at > SCAN_TTL:
                self._walked = [p for p in progressmod.find_runs(self.root, max_depth=SCAN_DEPTH)
                                if self.confined(p)]
                self._walked_at = now
                self._seen.update(self._walked)
            walked, candidates = set(self._walked), set(self._walked) | self._seen
        return sorted(p for p in candidates if (p in walked or os.path.exists(p) or os.path.isdir(p + RUN_SUFFIX))
                      and self.confined(p) and _is_text(p))

    def resolve(self, relative):
        """The absolute output path of a run named relative to the root, or None if it lies outside. A URL's '/'
        and this system's separators divide the name (on POSIX a backslash is a character of a name)."""
        if not relative or "\x00" in relative:
            return None
        parts = re.split("|".join(map(re.escape, _SEPARATORS)), relative)
        if any(part in ("", ".", "..") for part in parts):
            return None
        candidate = os.path.join(self.root, *parts)
        return candidate if self.confined(candidate) else None

    def resolve_absolute(self, path):
        """The run named by an absolute path (what a kernel knows of its output), if it lies under the root; its
        directory is compared by real path, as the root is."""
        if not path or not os.path.isabs(path) or "\x00" in path:
            return None
        path = os.path.normpath(path)
        relative = os.path.relpath(os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path)),
                                   self.root)
        if relative == ".." or relative.startswith(".." + os.sep):
            return None
        return self.resolve(relative.replace(os.sep, "/"))

    def confined(self, candidate):
        """True when the real paths of the parent directory, of what is read (the run directory, else the
        output) and of a ``.code.json`` beside it all lie inside the real root: no symlink leads out."""
        target = candidate + RUN_SUFFIX if os.path.isdir(candidate + RUN_SUFFIX) else candidate
        meta = candidate + META_SUFFIX
        reads = [os.path.dirname(candidate), target] + ([meta] if os.path.lexists(meta) else [])
        return all(self._inside(os.path.realpath(path)) for path in reads)

    def job_output(self, path, job):
        """What job ``job`` of the run at ``path`` printed (its end, at most ``OUTPUT_LIMIT`` characters), or None
        when its run directory or store is a link out of the root: the records are read there, not only the
        status file that ``confined`` covers."""
        if not all(self._inside(os.path.realpath(path + suffix)) for suffix in (RUN_SUFFIX, STORE_SUFFIX)):
            return None
        text = job_output(path, job)
        if len(text) > OUTPUT_LIMIT:
            text = CUT_MARK.format(len(text) - MAX_OUTPUT) + text[-MAX_OUTPUT:]
        return text

    def _inside(self, real):
        return real == self.root or real.startswith(os.path.join(self.root, ""))  # a root of "/" ends with it

    def relative(self, path):
        return os.path.relpath(path, self.root)

    def snapshot(self, path):
        data = progressmod.read_progress(path).to_dict()
        data["path"] = self.relative(path)
        data["output"] = data["path"]
        return data


class _RunsHandler:
    """What every page and API handler shares: the contents permission the server's authorizer decides on, and
    the run index and base URL, taken in ``prepare()`` after the server has authenticated the request."""

    auth_resource = "contents"

    async def prepare(self, **kwargs):
        await super().prepare(**kwargs)
        self.index = self.settings["mpitasker_index"]
        self.base = self.settings["mpitasker_base"]

    async def in_executor(self, fn, *args):
        """Disk reads off the event loop: the server never waits on a slow (network) file system."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)



class RunsAPI(_RunsHandler, APIHandler):
    @web.authenticated
    @authorized
    async def get(self):
        index = self.index
        runs = await self.in_executor(lambda: [index.snapshot(p) for p in index.paths()])
        self.finish(json.dumps({"root": index.root, "runs": runs, "time": time.time()}))


class RunAPI(_RunsHandler, APIHandler):
    @web.authenticated
    @authorized
    async def get(self, relative):
        path = self.index.resolve(relative)
        if path is None:
            raise web.HTTPError(404, "no such run under the server root")
        data = await self.in_executor(self.index.snapshot, path)
        if data["state"] == MISSING:
            raise web.HTTPError(404, "no such run under the server root")
        self.finish(json.dumps(data))


class OutputAPI(_RunsHandler, APIHandler):
    """What one job printed, asked for by its number: a run may have 100k jobs, so none are ever listed."""

    @web.authenticated
    @authorized
    async def get(self, relative):
        path = self.index.resolve(relative)
        if path is None or path.endswith(RUN_SUFFIX):
            raise web.HTTPError(404, "no such run under the server root")
        job = self.get_query_argument("job", "")
        if not JOB_NUMBER.fullmatch(job):
            raise web.HTTPError(400, "job= must be a job number: a whole number from 0")
        try:
            text = await self.in_executor(self.index.job_output, path, int(job))
        except UsageError as exc:                 # no record of that job: the message says why
            self._refuse(404, str(exc))
            return
        except CacheError as exc:                 # a damaged or vanished record
            self._refuse(500, str(exc))
            return
        if text is None:
            raise web.HTTPError(404, "no such run under the server root")
        self.finish(json.dumps({"path": self.index.relative(path), "job": int(job), "output": text}))

    def _refuse(self, status, message):
        """An error answer shaped like the server's own ({"message", "reason"}), written here since tornado would
        %-format a message carrying a run's name (which may hold a '%') into its log line."""
        self.log.info("mpitasker output %s: %s", status, message)
        self.set_status(status)
        self.finish(json.dumps({"message": message, "reason": None}))


class DashboardPage(_RunsHandler, JupyterHandler):
    @web.authenticated
    @authorized
    def get(self):
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(_page("mpitasker runs", "dashboard.js", self.base))


class RunPage(_RunsHandler, JupyterHandler):
    @web.authenticated
    @authorized
    async def get(self, relative):
        path = self.index.resolve(relative)
        if path is None or (await self.in_executor(progressmod.read_progress, path)).state == MISSING:
            raise web.HTTPError(404, "no such run under the server root")
        self.set_header("Content-Type", "text/html; charset=utf-8")
        relative = self.index.relative(path)
        self.finish(_page(f"mpitasker: {relative}", "run.js", self.base, run=relative))


class RunLink(_RunsHandler, JupyterHandler):
    """``mpitasker/open?path=ABSOLUTE``: the %%mpimap widget's link (a kernel knows its output's absolute path,
    not the server's root), redirected to the run's page when that path lies under the root."""

    @web.authenticated
    @authorized
    def get(self):
        path = self.index.resolve_absolute(self.get_query_argument("path", ""))
        if path is None:
            raise web.HTTPError(404, "no such run under the server root")
        self.redirect(url_path_join(self.base, "mpitasker/run", urllib.parse.quote(self.index.relative(path))))


class RunNameAPI(_RunsHandler, APIHandler):
    """``mpitasker/api/open?path=ABSOLUTE``: ``{"path": relative}``, the name the API gives the run of an absolute
    output path, by the same rule as ``mpitasker/open``. The Lab extension asks it when a link names a run
    absolutely: only the server knows the real paths (a root or an output reached through a symlink)."""

    @web.authenticated
    @authorized
    def get(self):
        path = self.index.resolve_absolute(self.get_query_argument("path", ""))
        if path is None:
            raise web.HTTPError(404, "not a run under the server root")
        self.finish(json.dumps({"path": self.index.relative(path)}))


def handlers(base):
    """The routes under the server's base URL."""
    return [
        (url_path_join(base, "mpitasker/?"), DashboardPage),
        (url_path_join(base, "mpitasker/open"), RunLink),
        (url_path_join(base, "mpitasker/run/(.+)"), RunPage),
        (url_path_join(base, "mpitasker/api/runs"), RunsAPI),
        (url_path_join(base, "mpitasker/api/open"), RunNameAPI),
        (url_path_join(base, "mpitasker/api/run/(.+)"), RunAPI),
        (url_path_join(base, "mpitasker/api/output/(.+)"), OutputAPI),
    ]


def load(serverapp):
    """Called by Jupyter server: register the handlers; the index lives in the web app's settings."""
    web_app = serverapp.web_app
    base = web_app.settings.get("base_url", "/")
    if not base.endswith("/"):
        base += "/"
    web_app.settings["mpitasker_index"] = RunIndex(serverapp.root_dir)
    web_app.settings["mpitasker_base"] = base
    web_app.add_handlers(".*$", handlers(base))
    serverapp.log.info("mpitasker_ext: run dashboard at %smpitasker/ (root %s)", base, serverapp.root_dir)


def _is_text(path):
    """True when a path is valid Unicode: a name of undecodable bytes (a lone surrogate in JSON) makes the pages'
    encodeURIComponent throw, which took every run off the dashboard; such runs are not listed."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _page(title, script_name, base, run=None):
    """The page template with its script; every value put in is escaped for where it goes (one pass, so a
    value can never inject another placeholder)."""
    values = {"__TITLE__": html.escape(title), "__BASE__": _js(base), "__RUN__": _js(run),
              "__SCRIPT__": _static(script_name)}
    page = _static("page.html").replace("__SCRIPT__", values.pop("__SCRIPT__"))
    return re.sub("|".join(values), lambda m: values[m.group(0)], page)


def _js(value):
    """A JSON literal safe inside <script>: no '</script>' or '<!--' can close or open anything."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _static(name):
    with open(os.path.join(os.path.dirname(__file__), "static", name), encoding="utf-8") as f:
        return f.read()
