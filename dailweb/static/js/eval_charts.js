// Evaluation charts: pass@k against k, and pass@k against token budget for a chosen k, one
// line per evaluation with its bootstrap interval as a shaded band. Data: the JSON in
// #eval-chart-data (training.selectors.Comparison.chart_data). Chart.js is served from our own
// static files (vendor/chartjs). The y axis is fixed at 0-100 % so small numbers look small.
(function () {
  "use strict";
  const source = document.getElementById("eval-chart-data");
  if (!source || typeof Chart === "undefined") return;
  const data = JSON.parse(source.textContent);
  const colours = ["#1f5fbf", "#b3261e", "#1e7a3c", "#9a6100", "#6a3fb5", "#00838f", "#5a6573", "#c2185b"];

  function alpha(hex, a) {
    const n = parseInt(hex.slice(1), 16);
    return `rgba(${(n >> 16) & 255}, ${(n >> 8) & 255}, ${n & 255}, ${a})`;
  }

  // Three datasets per evaluation: the lower bound (invisible), the upper bound filled down to
  // it, and the estimate itself. Points are aligned to `xs`; missing ones are null.
  function series(label, colour, points, key, xs) {
    const at = new Map(points.map((p) => [p[key], p]));
    const pick = (field) => xs.map((x) => (at.has(x) ? at.get(x)[field] : null));
    const band = { pointRadius: 0, borderWidth: 0, spanGaps: true, tension: 0 };
    return [
      { ...band, label: `_low ${label}`, data: pick("low"), fill: false },
      { ...band, label: `_high ${label}`, data: pick("high"), fill: "-1", backgroundColor: alpha(colour, 0.15) },
      { label, data: pick("value"), borderColor: colour, backgroundColor: colour, pointRadius: 3, spanGaps: true, tension: 0 },
    ];
  }

  function options(xTitle) {
    return {
      responsive: true,
      maintainAspectRatio: false,
      animation: false,
      interaction: { mode: "index", intersect: false },
      scales: {
        x: { title: { display: true, text: xTitle } },
        y: { min: 0, max: 1, title: { display: true, text: "pass@k" }, ticks: { callback: (v) => `${Math.round(v * 100)} %` } },
      },
      plugins: {
        legend: { labels: { filter: (item) => !item.text.startsWith("_") } },
        tooltip: {
          filter: (item) => !item.dataset.label.startsWith("_"),
          callbacks: { label: (item) => `${item.dataset.label}: ${(100 * item.parsed.y).toFixed(1)} %` },
        },
      },
    };
  }

  const passCanvas = document.getElementById("chart-pass-at-k");
  if (passCanvas) {
    const datasets = data.evaluations.flatMap((e, i) =>
      series(e.label, colours[i % colours.length], e.pass_at_k, "k", data.ks));
    new Chart(passCanvas, { type: "line", data: { labels: data.ks.map(String), datasets }, options: options("k (samples drawn)") });
  }

  const budgetCanvas = document.getElementById("chart-budget");
  const kSelect = document.getElementById("budget-k");
  if (budgetCanvas && kSelect) {
    const budgetDatasets = (k) => data.evaluations.flatMap((e, i) =>
      series(`${e.label} (pass@${k})`, colours[i % colours.length], e.budget_curves[String(k)] || [], "budget", data.budgets));
    const chart = new Chart(budgetCanvas, {
      type: "line",
      data: { labels: data.budgets.map(String), datasets: budgetDatasets(kSelect.value) },
      options: options("token budget (tokens used ≤ B)"),
    });
    kSelect.addEventListener("change", () => {
      chart.data.datasets = budgetDatasets(kSelect.value);
      chart.update();
    });
  }
})();
