const RUN = __RUN__;
async function refresh() {
  const open = new Set([...document.querySelectorAll("details.failure[open]")].map(d => d.dataset.index));
  try {
    const r = await getJSON(BASE + "mpitasker/api/run/" + runPath(RUN) + location.search);
    const ranks = r.ranks.map(k => `<tr><td>${num(k.rank)}</td><td>${num(k.current, "-")}${
      isNum(k.batch) && k.batch > 1 ? " (+" + num(k.batch - 1) + ")" : ""}</td>
      <td>${num(k.done)}</td><td>${num(k.failed)}</td></tr>`).join("");
    const failures = r.failures.map(f => `<details class="failure" data-index="${num(f.index)}"
      ${open.has(String(f.index)) ? "open" : ""}><summary>job ${num(f.index)}: ${esc(f.error)}</summary>
      <pre>${esc(f.traceback || f.error)}</pre>${f.output ? `<div class="muted">output of job ${num(f.index)}
      (last lines):</div><pre class="output">${esc(f.output)}</pre>` : ""}</details>`).join("");
    document.getElementById("content").innerHTML = `
      <p><span class="${esc(r.state)} state"><b>${esc(r.state)}</b></span> ${bar(r)}
         <span class="counts" data-done="${num(r.done)}" data-total="${num(r.total)}">${num(r.done)}/${num(r.total)} done</span>
         (${num(r.cached)} cached) · ${num(r.failed)} failed · ${num(r.running)} running · ${fixed(r.rate)} jobs/s ·
         elapsed ${dur(r.elapsed)} · ETA ${dur(r.eta)}</p>
      ${r.note ? `<p class="muted">${esc(r.note)}</p>` : ""}
      ${ranks ? `<table><tr><th>rank</th><th>current job</th><th>done</th><th>failed</th></tr>${ranks}</table>` : ""}
      ${failures ? `<h3>Failures</h3>${failures}` : ""}
      <p class="muted"><a href="${esc(BASE + "mpitasker/" + location.search)}">all runs</a></p>`;
  } catch (err) {
    document.getElementById("content").textContent = "cannot load the run: " + err.message;
  }
  setTimeout(refresh, 1000);
}
refresh();
