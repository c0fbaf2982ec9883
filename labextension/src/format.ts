/**
 * Turning API values into DOM text. Nothing from the API ever goes through innerHTML: elements are built here
 * and filled with textContent, numbers pass through isNum (anything else shows as 0 or '?'), and a state
 * becomes a CSS class only when it is one of the known states.
 */
import type { IRun } from './api';

const STATES = ['running', 'finished', 'failed', 'error', 'stale', 'interrupted', 'missing']; // status.STATES

export function isNum(value: unknown): value is number {
  return typeof value === 'number' && Number.isFinite(value);
}

export function count(value: unknown, none = '0'): string {
  return isNum(value) ? String(value) : none;
}

export function rate(value: unknown): string {
  return isNum(value) ? value.toFixed(1) : '0.0';
}

/** Seconds as H:MM:SS (days first when longer), '?' for anything unknown. */
export function duration(seconds: unknown): string {
  if (!isNum(seconds) || seconds < 0 || seconds > 1e9) {
    return '?';
  }
  const s = Math.round(seconds);
  const days = Math.floor(s / 86400);
  const clock = [Math.floor((s % 86400) / 3600), Math.floor((s % 3600) / 60), s % 60]
    .map((n, i) => (i === 0 ? String(n) : String(n).padStart(2, '0')))
    .join(':');
  return days ? `${days}d ${clock}` : clock;
}

export function text(value: unknown): string {
  return typeof value === 'string' ? value : '';
}

export function stateClass(state: unknown): string {
  return 'mpitasker-state-' + (typeof state === 'string' && STATES.includes(state) ? state : 'unknown');
}

/** A new element with a class and, optionally, its text. */
export function element<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className = '',
  textContent?: string
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (className) {
    node.className = className;
  }
  if (textContent !== undefined) {
    node.textContent = textContent;
  }
  return node;
}

/** The state label, coloured by state. */
export function setState(node: HTMLElement, state: unknown): void {
  node.textContent = text(state) || 'unknown';
  node.className = 'mpitasker-state ' + stateClass(state);
  node.dataset.state = node.textContent;
}

/** `done/total` with the raw numbers in data attributes, as on the dashboard. */
export function setCounts(node: HTMLElement, run: IRun): void {
  node.textContent = `${count(run.done)}/${count(run.total)}`;
  node.dataset.done = count(run.done);
  node.dataset.total = count(run.total);
}

/** A bar whose two segments are the done and the failed jobs, each in proportion to the total. */
export class ProgressBar {
  readonly node = element('div', 'mpitasker-bar');
  private readonly _done = element('div', 'mpitasker-bar-done');
  private readonly _failed = element('div', 'mpitasker-bar-failed');

  constructor() {
    this.node.append(this._done, this._failed);
    this.node.setAttribute('role', 'progressbar');
  }

  update(run: IRun): void {
    const total = isNum(run.total) && run.total > 0 ? run.total : 0;
    const part = (n: unknown) => (total && isNum(n) ? Math.min(Math.max(n / total, 0), 1) : 0);
    const done = part(run.done);
    const failed = Math.min(part(run.failed), 1 - done);
    this._done.style.width = `${(100 * done).toFixed(2)}%`;
    this._failed.style.width = `${(100 * failed).toFixed(2)}%`;
    this.node.setAttribute('aria-valuenow', String(Math.round(100 * (done + failed))));
    this.node.title = `${count(run.done)} done, ${count(run.failed)} failed of ${count(run.total)}`;
  }
}
