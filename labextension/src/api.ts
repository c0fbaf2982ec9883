/**
 * The read-only JSON API of the mpitasker server extension, called the way JupyterLab calls its own server:
 * through ServerConnection, which sends the token and the XSRF cookie, so Jupyter's authentication and
 * authorizer decide exactly as for the standalone /mpitasker/ page.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/** What one rank is doing (progress.RankState). */
export interface IRankState {
  rank: number;
  current: number | null;
  batch: number;
  done: number;
  failed: number;
}

/** One failed job (progress.Failure). `output` is the job's captured stdout/stderr when the server sends it. */
export interface IFailure {
  index: number;
  error: string;
  traceback: string;
  output?: string;
}

/**
 * One run (progress.Progress.to_dict() plus `path`, relative to the server's root). Every value comes from files
 * anyone with write access under the root may have planted: the views only ever put it into the DOM as text.
 */
export interface IRun {
  path: string;
  name: string;
  state: string;
  total: number;
  done: number;
  cached: number;
  failed: number;
  running: number;
  rate: number;
  elapsed: number;
  eta: number | null;
  note: string;
  ranks: IRankState[];
  failures: IFailure[];
}

/** GET /mpitasker/api/runs */
export interface IRunList {
  root: string;
  runs: IRun[];
  time: number;
}

/** GET /mpitasker/api/output/<path>?job=N: what one job printed ('' when nothing). */
export interface IJobOutput {
  path: string;
  job: number;
  output: string;
}

/** True for a run's path as the API names it: names divided by '/', none empty, '.' or '..' (in a URL those
 * would resolve into another route of the server, even percent-encoded). */
export function isRunPath(path: string): boolean {
  return String(path)
    .split('/')
    .every(part => part !== '' && part !== '.' && part !== '..');
}

/** A run's path as a URL: each segment encoded on its own, since '#' and '?' are legal in file names. */
export function runUrlPath(path: string): string {
  if (!isRunPath(path)) {
    throw new Error(`not a run path: ${path}`);
  }
  return String(path).split('/').map(encodeURIComponent).join('/');
}

export class RunsClient {
  constructor(readonly settings: ServerConnection.ISettings = ServerConnection.makeSettings()) {}

  /** Every run under the server's root. */
  runs(): Promise<IRunList> {
    return this._get('mpitasker/api/runs');
  }

  /** One run, by its path relative to the root. */
  async run(path: string): Promise<IRun> {
    return this._get('mpitasker/api/run/' + runUrlPath(path));
  }

  /**
   * What job `job` of a run printed, asked for one job at a time (a run may have 100k jobs). A job without a
   * record rejects with a `ResponseError` whose message is the server's, saying why.
   */
  jobOutput(path: string, job: number): Promise<IJobOutput> {
    return this._get('mpitasker/api/output/' + runUrlPath(path), URLExt.objectToQueryString({ job: String(job) }));
  }

  /** The run an absolute output path names, as the API names it (relative to the root). The server decides, by
   * real paths: the root or the output may be reached through a symlink. Rejects when it is not under the root. */
  async runName(absolutePath: string): Promise<string> {
    const answer = await this._get<{ path: unknown }>(
      'mpitasker/api/open',
      URLExt.objectToQueryString({ path: absolutePath })
    );
    if (typeof answer.path !== 'string' || !answer.path) {
      throw new Error(`the server named no run for ${absolutePath}`);
    }
    return answer.path;
  }

  /** The standalone page of a run (or of all runs), for front ends without this extension. */
  pageUrl(path?: string): string {
    const route = path === undefined ? 'mpitasker/' : 'mpitasker/run/' + runUrlPath(path);
    return URLExt.join(this.settings.baseUrl, route);
  }

  private async _get<T>(route: string, query = ''): Promise<T> {
    const url = URLExt.join(this.settings.baseUrl, route) + query; // (join would normalise the query as a path)
    const response = await ServerConnection.makeRequest(url, { method: 'GET' }, this.settings);
    if (!response.ok) {
      throw await ServerConnection.ResponseError.create(response);
    }
    return (await response.json()) as T;
  }
}
