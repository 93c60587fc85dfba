// The reviewer's trace page: colours tokens by shortcut score (log p_NR - log p_PS) on a
// diverging scale, draws the score/provenance lane, shows a token's probabilities and top
// alternatives on hover or focus, selects token ranges (mouse or shift+arrows) for shortcut
// spans, and maps single keys to the review actions. Verdicts and spans are saved by htmx.
(function () {
  "use strict";
  var dataNode = document.getElementById("trace-data");
  if (!dataNode) return;
  var data = JSON.parse(dataNode.textContent);
  var n = data.text.length;
  var text = document.getElementById("trace-text");
  var raw = document.getElementById("trace-raw");
  var info = document.getElementById("token-info");
  var slider = document.getElementById("threshold");
  var sliderValue = document.getElementById("threshold-value");
  var SCALE = 5;  // nats at full colour
  var focusIndex = -1, anchor = -1, selection = null;

  function delta(i) {
    var lp = data.lp[i];
    if (lp[1] === null || lp[2] === null) return 0;
    return lp[2] - lp[1];
  }
  // The palette and its strongest alpha are app.css's (--heat-*), which says why they are safe.
  var palette = getComputedStyle(document.documentElement);
  var POS = palette.getPropertyValue("--heat-pos-rgb").trim() || "230, 97, 0";
  var NEG = palette.getPropertyValue("--heat-neg-rgb").trim() || "0, 114, 178";
  var MAX_ALPHA = Number(palette.getPropertyValue("--heat-max-alpha")) || 0.7;
  function colour(d) {
    var a = Math.min(Math.abs(d) / SCALE, 1) * MAX_ALPHA;
    return "rgba(" + (d >= 0 ? POS : NEG) + ", " + a + ")";
  }
  function groupOf(el) {
    var i = Number(el.dataset.i), j = el.dataset.j !== undefined ? Number(el.dataset.j) : i;
    return [i, j];
  }
  function maxDelta(i, j) { var m = -Infinity; for (var k = i; k <= j; k++) m = Math.max(m, delta(k)); return m; }

  function paint() {
    var threshold = Number(slider.value);
    sliderValue.textContent = threshold.toFixed(1);
    text.querySelectorAll(".t, .tm").forEach(function (el) {
      var g = groupOf(el), d = maxDelta(g[0], g[1]);
      el.style.backgroundColor = colour(d);
      el.classList.toggle("over", d > threshold);
      var fallback = false;
      for (var k = g[0]; k <= g[1]; k++) if (data.source[k] === 1) fallback = true;
      el.classList.toggle("fallback", fallback);
    });
    raw.querySelectorAll(".rt").forEach(function (el) {
      var i = Number(el.dataset.i), d = delta(i);
      el.style.backgroundColor = colour(d);
      el.classList.toggle("over", d > threshold);
      el.classList.toggle("fallback", data.source[i] === 1);
    });
    paintSpans();
    drawLane(threshold);
  }

  function drawLane(threshold) {
    var canvas = document.getElementById("lane");
    var width = canvas.clientWidth || 600;
    canvas.width = width;
    var ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, width, canvas.height);
    var w = width / Math.max(n, 1);
    for (var i = 0; i < n; i++) {
      var d = delta(i);
      ctx.fillStyle = colour(d === 0 ? 0.0001 : d);
      ctx.fillRect(i * w, 0, Math.max(w, 1), 16);
      if (d > threshold) { ctx.fillStyle = "#111"; ctx.fillRect(i * w, 14, Math.max(w, 1), 2); }
      ctx.fillStyle = data.source[i] === 1 ? "#7b2cbf" : "#d0d5dc";
      ctx.fillRect(i * w, 19, Math.max(w, 1), 9);
    }
  }

  function visible(s) {
    return s.replace(/ /g, "·").replace(/\n/g, "↵\n").replace(/\t/g, "→");
  }
  function buildRaw() {
    var frag = document.createDocumentFragment();
    for (var i = 0; i < n; i++) {
      var span = document.createElement("span");
      span.className = "rt";
      span.dataset.i = i;
      span.textContent = visible(data.text[i]);
      frag.appendChild(span);
    }
    raw.appendChild(frag);
  }

  function prob(lp) { return lp === null ? "–" : (Math.exp(lp) * 100).toFixed(lp > -4.6 ? 1 : 3) + " %"; }
  function esc(s) { var d = document.createElement("span"); d.textContent = s; return d.innerHTML; }
  function alternatives(list, chosen) {
    return "<ol class='alts'>" + list.map(function (a) {
      var mine = a[0] === chosen ? " class='chosen'" : "";
      return "<li" + mine + "><code>" + esc(visible(a[0])) + "</code> " + prob(a[1]) + "</li>";
    }).join("") + "</ol>";
  }
  function inspect(i) {
    if (i < 0 || i >= n) return;
    var lp = data.lp[i], d = delta(i);
    info.innerHTML =
      "<p><code class='tok'>" + esc(visible(data.text[i])) + "</code> token " + i +
      " · from <strong>" + (data.source[i] === 1 ? "privileged fallback" : "learner") + "</strong>" +
      (data.draws[i] ? " · " + data.draws[i] + " draw" + (data.draws[i] === 1 ? "" : "s") : "") + "</p>" +
      "<table class='probs'><tr><th>learner</th><td>" + prob(lp[0]) + "</td></tr>" +
      "<tr><th>privileged (PS)</th><td>" + prob(lp[1]) + "</td></tr>" +
      "<tr><th>negative ref. (NR)</th><td>" + prob(lp[2]) + "</td></tr>" +
      "<tr><th>shortcut score</th><td>" + d.toFixed(2) + " nats</td></tr></table>" +
      "<div class='alt-cols'><div><h4>PS top</h4>" + alternatives(data.ps_top[i], data.text[i]) + "</div>" +
      "<div><h4>NR top</h4>" + alternatives(data.nr_top[i], data.text[i]) + "</div></div>";
  }

  function tokenElement(i) {
    var root = raw.hidden ? text : raw;
    var el = root.querySelector('[data-i="' + i + '"]');
    if (el) return el;
    var groups = root.querySelectorAll(".tm");
    for (var k = 0; k < groups.length; k++) {
      var g = groupOf(groups[k]);
      if (i >= g[0] && i <= g[1]) return groups[k];
    }
    return null;
  }
  function setFocus(i, extend) {
    i = Math.max(0, Math.min(n - 1, i));
    if (extend) { if (anchor < 0) anchor = focusIndex < 0 ? i : focusIndex; setSelection(Math.min(anchor, i), Math.max(anchor, i) + 1); }
    else { anchor = -1; }
    focusIndex = i;
    document.querySelectorAll(".focus").forEach(function (el) { el.classList.remove("focus"); });
    var el = tokenElement(i);
    if (el) { el.classList.add("focus"); el.scrollIntoView({ block: "nearest" }); }
    inspect(i);
  }

  function setSelection(start, end) {
    selection = start < end ? [start, end] : null;
    document.querySelectorAll(".sel").forEach(function (el) { el.classList.remove("sel"); });
    var infoBox = document.getElementById("selection-info");
    if (!selection) { if (infoBox) infoBox.textContent = "Select tokens with the mouse or shift + arrows."; return; }
    for (var k = start; k < end; k++) { var el = tokenElement(k); if (el) el.classList.add("sel"); }
    document.getElementById("span-start").value = start;
    document.getElementById("span-end").value = end;
    if (infoBox) infoBox.textContent = "Selected tokens " + start + "–" + (end - 1) + ": “" + data.text.slice(start, end).join("").slice(0, 80) + "”";
  }

  function paintSpans() {
    var list = document.querySelector("ul.spans");
    document.querySelectorAll(".in-span").forEach(function (el) { el.classList.remove("in-span"); });
    if (!list || !list.dataset.spans) return;
    list.dataset.spans.split(",").forEach(function (pair) {
      var p = pair.split("-"), a = Number(p[0]), b = Number(p[1]);
      for (var k = a; k < b; k++) { var el = tokenElement(k); if (el) el.classList.add("in-span"); }
    });
  }

  function tokenFromNode(node, isEnd) {
    var el = node && (node.nodeType === Node.TEXT_NODE ? node.parentElement : node);
    el = el && el.closest("[data-i]");
    if (!el) return null;
    var g = groupOf(el);
    return isEnd ? g[1] : g[0];
  }
  document.addEventListener("mouseup", function () {
    var sel = window.getSelection();
    if (!sel || sel.isCollapsed || sel.rangeCount === 0) return;
    var range = sel.getRangeAt(0);
    var root = raw.hidden ? text : raw;
    if (!root.contains(range.commonAncestorContainer)) return;
    var a = tokenFromNode(range.startContainer, false), b = tokenFromNode(range.endContainer, true);
    if (a === null || b === null) return;
    setSelection(Math.min(a, b), Math.max(a, b) + 1);
    sel.removeAllRanges();
  });

  function onPointer(event) {
    var el = event.target.closest && event.target.closest("[data-i]");
    if (!el || !(text.contains(el) || raw.contains(el))) return;
    inspect(groupOf(el)[0]);
  }
  text.addEventListener("mouseover", onPointer);
  raw.addEventListener("mouseover", onPointer);
  text.addEventListener("click", function (event) {
    var el = event.target.closest("[data-i]");
    if (el) setFocus(groupOf(el)[0], event.shiftKey);
  });

  function typing(target) {
    return target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA" || target.isContentEditable);
  }
  function press(key) {
    var button = document.querySelector('#review-panel [data-key="' + key + '"]');
    if (button) button.click();
  }

  // Accepting a trace with a wrong, missing or cut-off answer asks first (the form carries
  // data-concerns; the server refuses such an accept without confirm_incorrect anyway).
  function confirmPanel() {
    var panel = document.getElementById("accept-confirm");
    return panel && !panel.hidden ? panel : null;
  }
  function openConfirm() {
    var panel = document.getElementById("accept-confirm");
    if (!panel) return;
    panel.hidden = false;
    panel.querySelector('[data-confirm="accept"]').focus();
  }
  function closeConfirm() {
    var panel = document.getElementById("accept-confirm");
    if (!panel) return;
    panel.hidden = true;
    document.getElementById("confirm-incorrect").checked = false;
    var accept = document.querySelector('#review-panel [data-key="a"]');
    if (accept) accept.focus();
  }
  document.addEventListener("click", function (event) {
    var button = event.target.closest && event.target.closest("#verdict-form button");
    if (!button) return;
    var form = button.form;
    var box = document.getElementById("confirm-incorrect");
    if (button.dataset.confirm === "accept") { box.checked = true; return; }
    if (button.dataset.confirm === "cancel") { closeConfirm(); return; }
    if (button.dataset.key === "a" && form.dataset.concerns && !(box && box.checked)) {
      event.preventDefault();
      openConfirm();
    } else if (box && button.dataset.key !== "a") {
      box.checked = false;  // a reject or needs-fix never carries the confirmation
    }
  });

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    var help = document.getElementById("help");
    var panel = confirmPanel();
    var writing = event.target.tagName === "TEXTAREA" || (event.target.tagName === "INPUT" && event.target.type === "text");
    if (panel && !writing) {
      var onCancel = event.target.dataset && event.target.dataset.confirm === "cancel";
      if (event.key === "Escape" || (event.key === "Enter" && onCancel)) {
        event.preventDefault(); closeConfirm(); return;
      }
      if (event.key === "Enter" || event.key === "a") {
        event.preventDefault();
        panel.querySelector('[data-confirm="accept"]').click();
        return;
      }
    }
    if (typing(event.target)) return;
    switch (event.key) {
      case "ArrowRight": event.preventDefault(); setFocus(focusIndex + 1, event.shiftKey); break;
      case "ArrowLeft": event.preventDefault(); setFocus(focusIndex - 1, event.shiftKey); break;
      case "a": case "r": case "f": press(event.key); break;
      case "m":
        if (!selection) { document.getElementById("selection-info").textContent = "Select tokens first."; break; }
        document.getElementById("mark-span").click(); break;
      case "n": document.querySelector('[data-nav="next"]').click(); break;
      case "p": var prev = document.querySelector('[data-nav="previous"]'); if (prev) prev.click(); break;
      case "t": var toggle = document.getElementById("raw-toggle"); toggle.checked = !toggle.checked; toggle.dispatchEvent(new Event("change")); break;
      case "?": if (help.open) help.close(); else help.showModal(); break;
      default: return;
    }
  });
  document.querySelector('[data-action="help"]').addEventListener("click", function () {
    document.getElementById("help").showModal();
  });
  document.getElementById("raw-toggle").addEventListener("change", function (event) {
    raw.hidden = !event.target.checked;
    text.hidden = event.target.checked;
    if (selection) setSelection(selection[0], selection[1]);
    paintSpans();
  });
  document.addEventListener("click", function (event) {
    var go = event.target.closest("[data-goto]");
    if (go) setFocus(Number(go.dataset.goto), false);
  });
  slider.addEventListener("input", paint);
  window.addEventListener("resize", function () { drawLane(Number(slider.value)); });
  // After htmx swaps the review panel: keep span highlights in step, clear the selection.
  document.body.addEventListener("htmx:afterSwap", function (event) {
    if (event.detail.target && event.detail.target.id === "review-panel") {
      setSelection(0, 0); paintSpans();
      var panel = confirmPanel();  // the server asked for a confirmation: keys go to it
      if (panel) panel.querySelector('[data-confirm="accept"]').focus();
    }
  });

  // What-if waypoints: the server re-scores log p_NR; the page can show either set.
  var originalNR = data.lp.map(function (lp) { return lp[2]; });
  var whatifNR = null;
  function useNR(values) { for (var k = 0; k < n; k++) data.lp[k][2] = values[k]; paint(); if (focusIndex >= 0) inspect(focusIndex); }
  var whatifForm = document.getElementById("whatif-form");
  var whatifShow = document.getElementById("whatif-show");
  var whatifResult = document.getElementById("whatif-result");
  if (whatifForm) {
    whatifForm.addEventListener("submit", function (event) {
      event.preventDefault();
      whatifResult.textContent = "Re-scoring…";
      fetch(whatifForm.action, { method: "POST", body: new FormData(whatifForm), headers: { "X-Requested-With": "fetch" } })
        .then(function (r) { return r.json().then(function (body) { return [r.ok, body]; }); })
        .then(function (pair) {
          var body = pair[1];
          if (!pair[0]) { whatifResult.textContent = body.error || "Could not re-score."; return; }
          whatifNR = body.negative_logprobs;
          whatifShow.disabled = false;
          whatifShow.checked = true;
          useNR(whatifNR);
          whatifResult.textContent = "s~: " + body.partial_solution + " — shortcut max " +
            body.before.max.toFixed(2) + " → " + body.after.max.toFixed(2) + ", share above threshold " +
            body.before.share_above.toFixed(3) + " → " + body.after.share_above.toFixed(3) + ".";
        })
        .catch(function () { whatifResult.textContent = "Could not re-score."; });
    });
    whatifShow.addEventListener("change", function () { useNR(whatifShow.checked && whatifNR ? whatifNR : originalNR); });
  }

  buildRaw();
  paint();
})();
