/**
 * "Job output" in a run's tab: what any one job printed, asked for by its number. A run may have 100k jobs, so
 * none are listed; one GET per click, never polled (a finished job's output does not change).
 */
import { RunsClient } from './api';
import { element, text } from './format';

export class JobOutputView {
  readonly node = element('form', 'mpitasker-job-lookup');
  private readonly _input = element('input', 'mpitasker-job-index');
  private readonly _message = element('p', 'mpitasker-job-message');
  private readonly _output = element('pre', 'mpitasker-job-output');
  private _asked = 0;

  constructor(
    private readonly _client: RunsClient,
    private readonly _path: string
  ) {
    // The browser's own checks (min, step) would block the submit without a word: the view checks instead.
    this.node.noValidate = true;
    this._input.type = 'number';
    this._input.min = '0';
    this._input.step = '1';
    this._input.placeholder = 'job';
    this._input.setAttribute('aria-label', 'job number');
    const show = element('button', 'mpitasker-job-show jp-mod-styled', 'Show');
    show.type = 'submit';
    const row = element('div', 'mpitasker-job-row');
    row.append(element('span', 'mpitasker-job-label', 'Job output'), this._input, show);
    this._message.hidden = true;
    this._output.hidden = true;
    this.node.append(row, this._message, this._output);
    this.node.addEventListener('submit', event => {
      event.preventDefault();
      void this.show(this._input.value.trim());
    });
  }

  /** Ask the server for job `value`'s output; only the last answer asked for is shown. */
  async show(value: string): Promise<void> {
    const job = /^[0-9]+$/.test(value) ? Number(value) : NaN;
    if (!Number.isSafeInteger(job)) {
      this._say('Enter a job number: 0, 1, 2, …', true);
      return;
    }
    const asked = ++this._asked;
    this._say(`Loading job ${job}…`, false);
    this.node.dataset.job = String(job);
    try {
      const answer = await this._client.jobOutput(this._path, job);
      if (asked === this._asked) {
        const output = text(answer.output);
        this._say(output ? `Job ${job} printed:` : `Job ${job} printed nothing.`, false);
        this._output.textContent = output;
        this._output.hidden = !output;
      }
    } catch (err) {
      if (asked === this._asked) {
        this._say(err instanceof Error ? err.message : String(err), true);
      }
    }
  }

  private _say(message: string, isError: boolean): void {
    this._message.textContent = message;
    this._message.hidden = false;
    this._message.classList.toggle('mpitasker-job-error', isError);
    if (isError) {
      this._output.hidden = true;
      this._output.textContent = '';
    }
  }
}
