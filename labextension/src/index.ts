/**
 * The JupyterLab side of mpitasker_ext: an "MPI runs" panel in the left sidebar and one main-area tab per run,
 * both reading the server extension's authenticated, read-only JSON API. Only in JupyterLab (it needs the Lab
 * shell): other front ends keep the standalone /mpitasker/ pages.
 */
import {
  ILabShell,
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette, MainAreaWidget, WidgetTracker, showErrorMessage } from '@jupyterlab/apputils';
import { ILauncher } from '@jupyterlab/launcher';
import { ServerConnection } from '@jupyterlab/services';

import { RunsClient, isRunPath } from './api';
import { runsIcon } from './icon';
import { PANEL_ID, RunsPanel } from './panel';
import { RunView } from './runview';

export const SHOW_RUNS = 'mpitasker:show-runs';
export const OPEN_RUN = 'mpitasker:open-run';

/** Links that name a run (`<a data-mpitasker-run="PATH" href="…/mpitasker/open?path=PATH">`, as the %%mpimap
 * widget may render) open the run's tab here instead of the standalone page. PATH is relative to the server's
 * root, or absolute under it. */
const RUN_LINK = 'a[data-mpitasker-run]';

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'mpitasker-ext:plugin',
  description: 'The MPI runs under the server root: a sidebar panel and a tab per run.',
  autoStart: true,
  optional: [ILabShell, ICommandPalette, ILauncher, ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    labShell: ILabShell | null,
    palette: ICommandPalette | null,
    launcher: ILauncher | null,
    restorer: ILayoutRestorer | null
  ) => {
    if (!labShell) {
      return;
    }
    const client = new RunsClient(app.serviceManager.serverSettings);
    const tracker = new WidgetTracker<MainAreaWidget<RunView>>({ namespace: 'mpitasker-run' });
    const openRun = (path: string) =>
      app.commands.execute(OPEN_RUN, { path }).catch(err => console.error(`mpitasker: cannot open ${path}`, err));

    const panel = new RunsPanel(client, path => void openRun(path));
    panel.title.icon = runsIcon;
    panel.title.caption = 'MPI runs';
    labShell.add(panel, 'left', { rank: 600 });

    app.commands.addCommand(SHOW_RUNS, {
      label: args => (args.isPalette ? 'Show MPI runs' : 'MPI runs'),
      caption: 'The MPI runs under the server root, live',
      icon: args => (args.isPalette ? undefined : runsIcon),
      execute: () => labShell.activateById(PANEL_ID)
    });

    app.commands.addCommand(OPEN_RUN, {
      label: args => `MPI run ${String(args.path ?? '')}`,
      caption: 'Open one MPI run in a tab',
      describedBy: {
        args: {
          type: 'object',
          properties: { path: { type: 'string', description: "the run's output path, relative to the root" } },
          required: ['path']
        }
      },
      execute: args => {
        const path = String(args.path ?? '');
        if (!isRunPath(path)) {
          throw new Error(`not a run path: ${path}`);
        }
        const open = tracker.find(widget => widget.content.path === path);
        if (open) {
          labShell.activateById(open.id);
          return open;
        }
        const widget = new MainAreaWidget({ content: new RunView(client, path) });
        widget.id = `mpitasker-run-${encodeURIComponent(path)}`;
        widget.title.label = path.split('/').pop() || path;
        widget.title.caption = path;
        widget.title.icon = runsIcon;
        widget.title.closable = true;
        void tracker.add(widget);
        labShell.add(widget, 'main');
        labShell.activateById(widget.id);
        return widget;
      }
    });

    palette?.addItem({ command: SHOW_RUNS, category: 'MPI', args: { isPalette: true } });
    launcher?.add({ command: SHOW_RUNS, category: 'Other', rank: 10 });
    if (restorer) {
      restorer.add(panel, PANEL_ID);
      void restorer.restore(tracker, {
        command: OPEN_RUN,
        args: widget => ({ path: widget.content.path }),
        name: widget => widget.content.path
      });
    }

    document.addEventListener(
      'click',
      event => {
        const link = event.target instanceof Element ? event.target.closest<HTMLElement>(RUN_LINK) : null;
        const path = link?.dataset.mpitaskerRun;
        if (!path) {
          return;
        }
        event.preventDefault();
        runName(client, path)
          .then(openRun, err => void showErrorMessage('Cannot open the MPI run', whyNot(path, err)))
          .catch(err => console.error(`mpitasker: cannot open ${path}`, err));
      },
      true
    );
  }
};

/** A run path as the API names it. An absolute one is named by the server, which compares real paths (a root or
 * an output reached through a symlink is not a prefix of the other as a string). */
async function runName(client: RunsClient, path: string): Promise<string> {
  const name = path.startsWith('/') ? await client.runName(path) : path;
  if (!isRunPath(name)) {
    throw new Error('not a run path');
  }
  return name;
}

function whyNot(path: string, err: unknown): string {
  if (err instanceof ServerConnection.ResponseError && err.response.status === 404) {
    return `${path} is not under the Jupyter server's root, so this server does not show it.`;
  }
  return `${path}: ${err instanceof Error ? err.message : String(err)}`; // e.g. "not a run path"
}

export default plugin;
