/**
 * One run in a main-area tab: counts, the per-rank table, any job's output by its number (JobOutputView) and the
 * failures with their tracebacks (and each failed job's output, when the server sends an `output` field).
 * Failures are kept by job index and updated in place, so an opened traceback stays open and the scroll position
 * stays put across refreshes.
 */
import { IFailure, IRankState, IRun, RunsClient } from './api';
import { ProgressBar, count, duration, element, isNum, rate, setCounts, setState, text } from './format';
import { JobOutputView } from './joboutput';
import { LiveWidget } from './poll';

class FailureView {
  readonly node = element('details', 'mpitasker-failure');
  private readonly _summary = element('summary');
  private readonly _traceback = element('pre', 'mpitasker-traceback');
  private readonly _outputBox = element('div', 'mpitasker-output');
  private readonly _output = element('pre');

  constructor(index: string) {
    this.node.dataset.index = index;
    this._outputBox.append(element('div', 'mpitasker-output-label', 'output'), this._output);
    this.node.append(this._summary, this._traceback, this._outputBox);
  }

  update(failure: IFailure): void {
    this._summary.textContent = `job ${count(failure.index, '?')}: ${text(failure.error)}`;
    this._traceback.textContent = text(failure.traceback) || text(failure.error);
    const output = text(failure.output);
    this._output.textContent = output;
    this._outputBox.hidden = !output;
  }
}

export class RunView extends LiveWidget {
  private readonly _state = element('span');
  private readonly _bar = new ProgressBar();
  private readonly _counts = element('span', 'mpitasker-counts');
  private readonly _summary = element('span', 'mpitasker-summary');
  private readonly _note = element('p', 'mpitasker-note');
  private readonly _error = element('p', 'mpitasker-error');
  private readonly _ranks = element('tbody');
  private readonly _rankTable = element('table', 'mpitasker-ranks');
  private readonly _failures = element('div', 'mpitasker-failures');
  private readonly _failureHeading = element('h3', '', 'Failures');
  private readonly _failureViews = new Map<string, FailureView>();

  constructor(
    private readonly _client: RunsClient,
    readonly path: string
  ) {
    super();
    this.addClass('mpitasker-runview');
    this.node.dataset.path = path;
    const heading = element('h2', 'mpitasker-heading', path);
    const line = element('div', 'mpitasker-run-line');
    line.append(this._state, this._bar.node, this._counts, this._summary);
    const head = element('thead');
    const headRow = element('tr');
    for (const label of ['rank', 'current job', 'done', 'failed']) {
      headRow.append(element('th', '', label));
    }
    head.append(headRow);
    this._rankTable.append(head, this._ranks);
    const standalone = element('a', 'mpitasker-standalone', 'standalone page');
    standalone.href = _client.pageUrl(path);
    standalone.target = '_blank';
    standalone.rel = 'noopener';
    this._failureHeading.hidden = true;
    this._error.hidden = true;
    const jobOutput = new JobOutputView(_client, path);
    this.node.append(heading, line, this._error, this._note, this._rankTable, jobOutput.node, this._failureHeading,
      this._failures, standalone);
  }

  async refresh(): Promise<void> {
    let run: IRun;
    try {
      run = await this._client.run(this.path);
    } catch (err) {
      this._error.textContent = `cannot load the run: ${err instanceof Error ? err.message : String(err)}`;
      this._error.hidden = false;
      return;
    }
    this._error.hidden = true;
    setState(this._state, run.state);
    this._bar.update(run);
    setCounts(this._counts, run);
    this._summary.textContent =
      ` done (${count(run.cached)} cached) · ${count(run.failed)} failed · ${count(run.running)} running · ` +
      `${rate(run.rate)} jobs/s · elapsed ${duration(run.elapsed)} · ETA ${duration(run.eta)}`;
    this._note.textContent = text(run.note);
    this._note.hidden = !run.note;
    this._updateRanks(Array.isArray(run.ranks) ? run.ranks : []);
    this._updateFailures(Array.isArray(run.failures) ? run.failures : []);
  }

  private _updateRanks(ranks: IRankState[]): void {
    const rows = ranks.map(rank => {
      const row = element('tr');
      const current = isNum(rank.current)
        ? count(rank.current) + (isNum(rank.batch) && rank.batch > 1 ? ` (+${rank.batch - 1})` : '')
        : '-';
      for (const value of [count(rank.rank), current, count(rank.done), count(rank.failed)]) {
        row.append(element('td', '', value));
      }
      return row;
    });
    this._ranks.replaceChildren(...rows);
    this._rankTable.hidden = !rows.length;
  }

  private _updateFailures(failures: IFailure[]): void {
    const seen = new Set<string>();
    for (const failure of failures) {
      const key = count(failure.index, '?');
      if (seen.has(key)) {
        continue;
      }
      const position = seen.size;
      seen.add(key);
      let view = this._failureViews.get(key);
      if (!view) {
        view = new FailureView(key);
        this._failureViews.set(key, view);
      }
      view.update(failure);
      if (this._failures.children[position] !== view.node) {
        this._failures.insertBefore(view.node, this._failures.children[position] ?? null);
      }
    }
    for (const [key, view] of this._failureViews) {
      if (!seen.has(key)) {
        view.node.remove();
        this._failureViews.delete(key);
      }
    }
    this._failureHeading.hidden = !seen.size;
  }
}
