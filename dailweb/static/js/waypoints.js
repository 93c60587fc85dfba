// Waypoint marking: turn a selection (in the source textarea, or in the pane that shows the
// source with rendered math) into character offsets of the source, and ask the server to add
// it. Everything else (the list, s~, prompts) is server-rendered through htmx.
(function () {
  "use strict";

  function editor() { return document.getElementById("editor"); }

  // Offset in the source of a DOM position (node, offset) inside the marking pane.
  function sourceOffset(node, offset, isEnd) {
    var el = node.nodeType === Node.TEXT_NODE ? node.parentElement : node;
    var piece = el && el.closest("[data-start]");
    if (!piece) {
      // Selection edge on the pane itself: offset counts child pieces.
      var pane = document.getElementById("marking");
      if (node === pane) {
        var child = pane.children[Math.min(offset, pane.children.length - 1)];
        if (!child) return null;
        return Number(offset >= pane.children.length ? child.dataset.end : child.dataset.start);
      }
      return null;
    }
    var start = Number(piece.dataset.start), end = Number(piece.dataset.end);
    if (piece.classList.contains("src-math")) return isEnd ? end : start;  // a formula whole
    if (node.nodeType === Node.TEXT_NODE) return start + Math.min(offset, end - start);
    return offset === 0 ? start : end;
  }

  function markingSelection() {
    var sel = window.getSelection();
    if (!sel || sel.rangeCount === 0 || sel.isCollapsed) return null;
    var range = sel.getRangeAt(0);
    var pane = document.getElementById("marking");
    if (!pane || !pane.contains(range.commonAncestorContainer)) return null;
    var a = sourceOffset(range.startContainer, range.startOffset, false);
    var b = sourceOffset(range.endContainer, range.endOffset, true);
    if (a === null || b === null || a === b) return null;
    return [Math.min(a, b), Math.max(a, b)];
  }

  function textareaSelection() {
    var area = document.getElementById("id_body");
    // A textarea keeps its selection after it loses focus: only a selection in the focused
    // textarea counts, so an old one is never marked again.
    if (!area || document.activeElement !== area) return null;
    if (area.selectionStart === area.selectionEnd) return null;
    // Browsers use "\n" in the value; the server normalises "\r\n" to "\n" too.
    return [area.selectionStart, area.selectionEnd];
  }

  function say(text) {
    var status = document.getElementById("mark-status");
    if (status) status.textContent = text;
  }

  function markSelection() {
    var span = markingSelection() || textareaSelection();
    if (!span) {
      say("Select text first (in the source or in the pane below), then mark it.");
      return;
    }
    say("");
    var form = editor();
    // getAttribute, not form.dataset: a form with a field named "dataset" shadows it.
    htmx.ajax("POST", form.getAttribute("data-preview-url"), {
      source: form, target: "#live-panel", swap: "outerHTML",
      values: { action: "add", start: span[0], end: span[1] }
    });
    // The selection is used up: collapse it, so that pressing Alt+W again adds nothing.
    var sel = window.getSelection();
    if (sel) sel.removeAllRanges();
    var area = document.getElementById("id_body");
    if (area && document.activeElement === area) area.setSelectionRange(span[1], span[1]);
  }

  document.addEventListener("keydown", function (event) {
    if (!editor()) return;
    if (event.altKey && (event.key === "w" || event.key === "W" || event.code === "KeyW")) {
      event.preventDefault();
      markSelection();
    }
  });
  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-action=mark]");
    if (button && editor()) { event.preventDefault(); markSelection(); }
  });
  // The mark button must not steal the selection from the textarea.
  document.addEventListener("mousedown", function (event) {
    if (event.target.closest("[data-action=mark]")) event.preventDefault();
  });
})();
