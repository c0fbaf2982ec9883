/**
 * Refreshing once a second only while a view can be seen: the sidebar panel and run tabs start this when
 * shown and stop it when hidden, so a collapsed panel or a background tab costs the server nothing.
 */
import { Message } from '@lumino/messaging';
import { Widget } from '@lumino/widgets';

export class VisiblePoll {
  private _timer: number | undefined;
  private _generation = 0;
  private _running = false;

  constructor(
    private readonly _tick: () => Promise<void>,
    private readonly _interval = 1000
  ) {}

  get running(): boolean {
    return this._running;
  }

  start(): void {
    if (!this._running) {
      this._running = true;
      void this._loop(++this._generation);
    }
  }

  stop(): void {
    this._running = false;
    this._generation++;
    window.clearTimeout(this._timer);
  }

  /** One request at a time, the next a second after the last answer; none while the browser tab is hidden. A
   * stop() (or a stop() and start()) while a request is out ends this loop: its generation is gone. */
  private async _loop(generation: number): Promise<void> {
    while (generation === this._generation) {
      if (!document.hidden) {
        try {
          await this._tick();
        } catch (err) {
          console.error('mpitasker: refresh failed', err);
        }
      }
      if (generation !== this._generation) {
        return;
      }
      await new Promise<void>(resolve => {
        this._timer = window.setTimeout(resolve, this._interval);
      });
    }
  }
}

/** A widget that refreshes itself once a second while it is visible, and not at all while hidden. */
export abstract class LiveWidget extends Widget {
  private readonly _poll = new VisiblePoll(() => this.refresh());

  /** Fetch from the server and update the DOM; errors are shown in the widget, not thrown. */
  abstract refresh(): Promise<void>;

  /** True while the widget polls the server. */
  get refreshing(): boolean {
    return this._poll.running;
  }

  protected onAfterAttach(msg: Message): void {
    super.onAfterAttach(msg);
    if (this.isVisible) {
      this._poll.start();
    }
  }

  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    this._poll.start();
  }

  protected onBeforeHide(msg: Message): void {
    super.onBeforeHide(msg);
    this._poll.stop();
  }

  protected onBeforeDetach(msg: Message): void {
    this._poll.stop();
    super.onBeforeDetach(msg);
  }

  dispose(): void {
    this._poll.stop();
    super.dispose();
  }
}
