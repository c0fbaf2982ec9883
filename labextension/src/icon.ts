import { LabIcon } from '@jupyterlab/ui-components';

/** Four ranks' bars, for the sidebar tab, the launcher and the run tabs. */
export const runsIcon = new LabIcon({
  name: 'mpitasker-ext:runs',
  svgstr: `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <rect x="3" y="4" width="14" height="3" rx="1"/>
    <rect x="3" y="9" width="18" height="3" rx="1"/>
    <rect x="3" y="14" width="9" height="3" rx="1"/>
    <rect x="3" y="19" width="16" height="3" rx="1"/>
  </g>
</svg>`
});
