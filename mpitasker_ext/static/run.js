const RUN = __RUN__;
async function refresh() {
  const open = new Set([...document.querySelectorAll("details.failure[open]")].map(d => d.dataset.index));
  try {
    const r = await getJSON(BASE + "mpitasker/api/run/" + encodeURI(RUN) + location.search);
    const ranks = r.ranks.map(k => `<tr><td>${k.rank}</td><td>${k.current ?? "-"}${k.batch > 1 ? " (+" + (k.batch - 1) + ")" : ""}</td>
      <td>${k.done}</td><td>${k.failed}</td></tr>`).join("");
    const failures = r.failures.map(f => `<details class="failure" data-index="${f.index}"
      ${open.has(String(f.index)) ? "open" : ""}><summary>job ${f.index}: ${esc(f.error)}</summary>
      <pre>${esc(f.traceback || f.error)}</pre></details>`).join("");
    document.getElementById("content").innerHTML = `
      <p><span class="${esc(r.state)} state"><b>${esc(r.state)}</b></span> ${bar(r)}
         <span class="counts" data-done="${r.done}" data-total="${r.total}">${r.done}/${r.total} done</span>
         (${r.cached} cached) · ${r.failed} failed · ${r.running} running · ${r.rate.toFixed(1)} jobs/s ·
         elapsed ${dur(r.elapsed)} · ETA ${dur(r.eta)}</p>
      ${r.note ? `<p class="muted">${esc(r.note)}</p>` : ""}
      ${ranks ? `<table><tr><th>rank</th><th>current job</th><th>done</th><th>failed</th></tr>${ranks}</table>` : ""}
      ${failures ? `<h3>Failures</h3>${failures}` : ""}
      <p class="muted"><a href="${BASE}mpitasker/${location.search}">all runs</a></p>`;
  } catch (err) {
    document.getElementById("content").textContent = "cannot load the run: " + err.message;
  }
  setTimeout(refresh, 1000);
}
refresh();
