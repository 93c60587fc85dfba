// The expansion launch form: blank rollout fields take the chosen preset's value; their
// placeholders show that value, following the preset select (the server resolves it anyway).
(function () {
  "use strict";
  var select = document.getElementById("id_preset");
  if (!select || !select.dataset.presets) return;
  var presets = JSON.parse(select.dataset.presets);
  function show() {
    var values = presets[select.value] || {};
    Object.keys(values).forEach(function (name) {
      var input = document.getElementById("id_" + name);
      if (!input) return;
      if (input.tagName === "SELECT") {
        var blank = input.querySelector('option[value=""]');
        if (blank) blank.textContent = "from the preset (" + values[name] + ")";
      } else {
        input.placeholder = "preset: " + values[name];
      }
    });
  }
  select.addEventListener("change", show);
  show();
})();
