async function refresh() {
  try {
    const data = await getJSON(BASE + "mpitasker/api/runs" + location.search);
    if (!data.runs.length) {
      document.getElementById("content").innerHTML = `No runs under ${esc(data.root)} yet.`;
    } else {
      const rows = data.runs.map(r => `<tr class="run" data-path="${esc(r.path)}">
        <td><a href="${BASE}mpitasker/run/${encodeURI(r.path)}${location.search}">${esc(r.path)}</a></td>
        <td class="${esc(r.state)} state">${esc(r.state)}</td>
        <td>${bar(r)}</td>
        <td class="counts" data-done="${r.done}" data-total="${r.total}">${r.done}/${r.total}</td>
        <td>${r.cached}</td><td>${r.failed}</td><td>${r.running}</td>
        <td>${r.rate.toFixed(1)}</td><td>${dur(r.elapsed)}</td><td>${dur(r.eta)}</td></tr>`).join("");
      document.getElementById("content").innerHTML = `<table><tr><th>run</th><th>state</th><th>progress</th>
        <th>done</th><th>cached</th><th>failed</th><th>running</th><th>jobs/s</th><th>elapsed</th><th>ETA</th></tr>
        ${rows}</table><div class="muted">root ${esc(data.root)} · refreshed ${new Date().toLocaleTimeString()}</div>`;
    }
  } catch (err) {
    document.getElementById("content").textContent = "cannot load the runs: " + err.message;
  }
  setTimeout(refresh, 1000);
}
refresh();
