// storno dashboard: confirmations, optional auto-refresh, local times in tooltips.
// Nothing here fetches from another origin; the pages work without it.
(function () {
  "use strict";
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
    }
  });

  var KEY = "storno.live";
  var timer = null;
  function schedule(on) {
    if (timer) { clearTimeout(timer); timer = null; }
    if (on) { timer = setTimeout(function () { window.location.reload(); }, 5000); }
  }
  document.querySelectorAll("input[data-live]").forEach(function (box) {
    box.checked = window.localStorage.getItem(KEY) === "1";
    schedule(box.checked);
    box.addEventListener("change", function () {
      window.localStorage.setItem(KEY, box.checked ? "1" : "0");
      schedule(box.checked);
    });
  });
  // Typing in a form pauses auto-refresh so nothing is lost.
  document.addEventListener("input", function () { schedule(false); });

  document.querySelectorAll("time[datetime]").forEach(function (el) {
    var when = new Date(el.getAttribute("datetime"));
    if (!isNaN(when.getTime())) {
      el.title = when.toLocaleString() + " (your time)";
    }
  });
})();
