// Live training curves: loss, KL to the privileged view (with gamma * KL to the negative
// reference dashed beside it, so its dominance is visible), KL to the negative reference and
// the learning rate, one point per optimizer step. The first points come with the page
// (#training-chart-data); while the job is queued or running, the metrics endpoint
// (data-url on #training-charts) is polled for the steps after the last one drawn. A new
// attempt (retry/resume) redraws from scratch, since steps after its checkpoint run again.
// Chart.js is served from our own static files (vendor/chartjs).
(function () {
  "use strict";
  const root = document.getElementById("training-charts");
  const source = document.getElementById("training-chart-data");
  if (!root || !source || typeof Chart === "undefined") return;
  const POLL_MS = 2000;
  let doc = JSON.parse(source.textContent);
  const gamma = doc.gamma;

  // canvas id -> the series drawn on it: [label, value of a point, colour, dashed]
  const specs = {
    "chart-loss": [[doc.objective === "nll" ? "NLL" : "total loss", (p) => p.loss, "#1f5fbf", false]],
    "chart-kl-privileged": [
      ["KL(θ‖PS)", (p) => p.kl_privileged, "#1e7a3c", false],
      ["γ·KL(θ‖NR)", (p) => (p.kl_negative == null ? null : gamma * p.kl_negative), "#b3261e", true],
    ],
    "chart-kl-negative": [["KL(θ‖NR)", (p) => p.kl_negative, "#b3261e", false]],
    "chart-lr": [["learning rate", (p) => p.lr, "#6a3fb5", false]],
  };

  const charts = [];
  for (const [id, series] of Object.entries(specs)) {
    const canvas = document.getElementById(id);
    if (!canvas) continue;
    const datasets = series.map(([label, , colour, dashed]) => ({
      label, data: [], borderColor: colour, backgroundColor: colour, borderDash: dashed ? [6, 4] : [],
      pointRadius: 2, tension: 0, spanGaps: true,
    }));
    const chart = new Chart(canvas, {
      type: "line",
      data: { datasets },
      options: {
        responsive: true,
        maintainAspectRatio: false,
        animation: false,
        parsing: false,
        interaction: { mode: "nearest", axis: "x", intersect: false },
        scales: {
          x: { type: "linear", title: { display: true, text: "step" }, ticks: { precision: 0 }, suggestedMin: 0, suggestedMax: doc.total_steps || undefined },
          y: { title: { display: true, text: id === "chart-lr" ? "lr" : "nats per token" } },
        },
        plugins: { legend: { display: series.length > 1 } },
      },
    });
    charts.push({ chart, series });
  }

  let lastStep = 0;
  let attempt = doc.attempt;

  function draw(points, reset) {
    for (const { chart, series } of charts) {
      series.forEach(([, value], i) => {
        const data = chart.data.datasets[i].data;
        if (reset) data.length = 0;
        for (const p of points) {
          const y = value(p);
          if (y != null) data.push({ x: p.step, y });
        }
      });
      chart.update("none");
    }
    if (reset) lastStep = 0;
    for (const p of points) lastStep = Math.max(lastStep, p.step);
    root.dataset.points = String(lastStep);
  }

  async function poll() {
    let next;
    try {
      const response = await fetch(`${root.dataset.url}?after=${lastStep}`, { headers: { Accept: "application/json" } });
      if (!response.ok) throw new Error(response.statusText);
      next = await response.json();
      if (next.attempt !== attempt) {
        // A new attempt resumed from a checkpoint: fetch everything and redraw.
        const all = await fetch(`${root.dataset.url}?after=0`, { headers: { Accept: "application/json" } });
        next = await all.json();
        attempt = next.attempt;
        draw(next.points, true);
      } else {
        draw(next.points, false);
      }
      doc = next;
    } catch (error) {
      next = doc; // keep trying while the job was last seen active
    }
    if (next.active) window.setTimeout(poll, POLL_MS);
    else root.dataset.finished = "true";
  }

  draw(doc.points, true);
  // Also poll once when the page was loaded just as the job finished, and whenever the status
  // card says the job became active again (retry from this page reloads it anyway).
  if (doc.active) window.setTimeout(poll, POLL_MS);
  else root.dataset.finished = "true";
})();
