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

// "Job output": what any one job printed, asked for by its number (a run may have 100k jobs: none are listed).
// Built once outside #content, which each refresh rewrites; the answer goes in through textContent only.
const jobForm = document.createElement("form");
jobForm.id = "job-lookup";
jobForm.noValidate = true;
jobForm.innerHTML = `<b>Job output</b> <input type="number" min="0" step="1" placeholder="job" aria-label="job number">
  <button type="submit">Show</button><p class="job-message muted" hidden></p><pre class="job-output" hidden></pre>`;
document.getElementById("content").after(jobForm);
const jobMessage = jobForm.querySelector(".job-message"), jobOutput = jobForm.querySelector(".job-output");
let jobAsked = 0;
function jobSay(message, isError) {
  jobMessage.textContent = message;
  jobMessage.hidden = false;
  jobMessage.className = "job-message " + (isError ? "error" : "muted");
  if (isError) { jobOutput.hidden = true; jobOutput.textContent = ""; }
}
jobForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const value = jobForm.querySelector("input").value.trim();
  if (!/^[0-9]+$/.test(value) || !Number.isSafeInteger(Number(value))) {
    jobSay("Enter a job number: 0, 1, 2, …", true);
    return;
  }
  const job = Number(value), asked = ++jobAsked, query = new URLSearchParams(location.search);
  query.set("job", String(job));
  jobSay(`Loading job ${job}…`, false);
  try {
    const response = await fetch(BASE + "mpitasker/api/output/" + runPath(RUN) + "?" + query,
                                 {credentials: "same-origin"});
    const json = (response.headers.get("Content-Type") || "").includes("json");
    const body = json ? await response.json() : {};
    if (asked !== jobAsked) return;
    if (!response.ok) {
      jobSay(typeof body.message === "string" ? body.message : response.status + " " + response.statusText, true);
      return;
    }
    const output = typeof body.output === "string" ? body.output : "";
    jobSay(output ? `Job ${job} printed:` : `Job ${job} printed nothing.`, false);
    jobOutput.textContent = output;
    jobOutput.hidden = !output;
  } catch (err) {
    if (asked === jobAsked) jobSay("cannot load the job's output: " + err.message, true);
  }
});
