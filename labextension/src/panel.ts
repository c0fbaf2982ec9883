/**
 * The "MPI runs" sidebar panel: every run under the server's root, one row each, refreshed while visible.
 * Rows are kept by path and updated in place, so a click never lands on a row that a refresh just replaced.
 */
import { IRun, RunsClient } from './api';
import { ProgressBar, count, duration, element, rate, setCounts, setState, text } from './format';
import { LiveWidget } from './poll';

export const PANEL_ID = 'mpitasker-runs';

class RunRow {
  readonly node = element('li', 'mpitasker-run');
  private readonly _name = element('span', 'mpitasker-run-name');
  private readonly _state = element('span');
  private readonly _bar = new ProgressBar();
  private readonly _counts = element('span', 'mpitasker-counts');
  private readonly _failed = element('span', 'mpitasker-failed');
  private readonly _rate = element('span', 'mpitasker-rate');
  private readonly _eta = element('span', 'mpitasker-eta');

  constructor(path: string, open: (path: string) => void) {
    this.node.dataset.path = path;
    this.node.tabIndex = 0;
    this.node.setAttribute('role', 'button');
    this._name.textContent = path;
    this.node.title = `${path}: click to open`;
    const head = element('div', 'mpitasker-run-head');
    head.append(this._name, this._state);
    const line = element('div', 'mpitasker-run-line');
    line.append(this._counts, this._failed, this._rate, this._eta);
    this.node.append(head, this._bar.node, line);
    this.node.addEventListener('click', () => open(path));
    this.node.addEventListener('keydown', event => {
      if (event.key === 'Enter' || event.key === ' ') {
        event.preventDefault();
        open(path);
      }
    });
  }

  update(run: IRun): void {
    setState(this._state, run.state);
    this._bar.update(run);
    setCounts(this._counts, run);
    this._failed.textContent = run.failed ? `${count(run.failed)} failed` : '';
    this._rate.textContent = `${rate(run.rate)} jobs/s`;
    this._eta.textContent = run.state === 'running' ? `ETA ${duration(run.eta)}` : '';
  }
}

export class RunsPanel extends LiveWidget {
  private readonly _rows = new Map<string, RunRow>();
  private readonly _list = element('ul', 'mpitasker-runs');
  private readonly _status = element('div', 'mpitasker-status', 'loading…');

  constructor(
    private readonly _client: RunsClient,
    private readonly _open: (path: string) => void
  ) {
    super();
    this.id = PANEL_ID;
    this.addClass('mpitasker-panel');
    const heading = element('h2', 'mpitasker-heading', 'MPI runs');
    const all = element('a', 'mpitasker-standalone', 'standalone page');
    all.href = _client.pageUrl();
    all.target = '_blank';
    all.rel = 'noopener';
    this.node.append(heading, this._list, this._status, all);
  }

  async refresh(): Promise<void> {
    let runs: IRun[];
    let root: string;
    try {
      const data = await this._client.runs();
      runs = Array.isArray(data.runs) ? data.runs : [];
      root = text(data.root);
    } catch (err) {
      this._status.textContent = `cannot load the runs: ${err instanceof Error ? err.message : String(err)}`;
      return;
    }
    const seen = new Set<string>();
    for (const run of runs) {
      const path = text(run.path);
      if (!path || seen.has(path)) {
        continue;
      }
      const position = seen.size;
      seen.add(path);
      let row = this._rows.get(path);
      if (!row) {
        row = new RunRow(path, this._open);
        this._rows.set(path, row);
      }
      row.update(run);
      if (this._list.children[position] !== row.node) {
        this._list.insertBefore(row.node, this._list.children[position] ?? null);
      }
    }
    for (const [path, row] of this._rows) {
      if (!seen.has(path)) {
        row.node.remove();
        this._rows.delete(path);
      }
    }
    this._status.textContent = seen.size ? `under ${root}` : `no runs under ${root} yet`;
    this._status.title = `refreshed ${new Date().toLocaleTimeString()}`;
  }
}
