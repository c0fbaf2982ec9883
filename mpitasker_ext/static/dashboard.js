async function refresh() {
  try {
    const data = await getJSON(BASE + "mpitasker/api/runs" + location.search);
    if (!data.runs.length) {
      document.getElementById("content").innerHTML = `No runs under ${esc(data.root)} yet.`;
    } else {
      const rows = data.runs.map(r => `<tr class="run" data-path="${esc(r.path)}">
        <td><a href="${esc(BASE + "mpitasker/run/" + runPath(r.path) + location.search)}">${esc(r.path)}</a></td>
        <td class="${esc(r.state)} state">${esc(r.state)}</td>
        <td>${bar(r)}</td>
        <td class="counts" data-done="${num(r.done)}" data-total="${num(r.total)}">${num(r.done)}/${num(r.total)}</td>
        <td>${num(r.cached)}</td><td>${num(r.failed)}</td><td>${num(r.running)}</td>
        <td>${fixed(r.rate)}</td><td>${dur(r.elapsed)}</td><td>${dur(r.eta)}</td></tr>`).join("");
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
