// The live TAMER page: show the newest frame, send + / - presses, show progress.
// A file rather than an inline script: the Content-Security-Policy allows scripts from /static only.
(function () {
  "use strict";
  var img = document.getElementById("frame");
  var line = document.getElementById("tamer-status");
  var done = false;

  function show(s) {
    if (!line || !s) return;
    done = s.done;
    var text = "presses sent: " + s.presses;
    if (s.episode !== undefined) text += " · episodes done: " + (s.episode + 1) + " · last true return: " + s["reward/true"];
    if (s.done) text += " · training finished";
    line.textContent = text;
  }

  function refresh() {
    if (done) return;
    img.src = "/frame?t=" + Date.now();
  }
  img.addEventListener("load", function () { setTimeout(refresh, 50); });
  img.addEventListener("error", function () { setTimeout(refresh, 300); });

  function press(h) {
    fetch("/press", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ h: h }) })
      .then(function (r) { return r.json(); }).then(show);
  }

  document.addEventListener("keydown", function (ev) {
    var k = ev.key;
    if (k === "+" || k === "=" || k === "ArrowUp") { press(1); ev.preventDefault(); }
    else if (k === "-" || k === "_" || k === "ArrowDown") { press(-1); ev.preventDefault(); }
  });
  document.querySelectorAll("[data-h]").forEach(function (b) {
    b.addEventListener("click", function () { press(Number(b.dataset.h)); });
  });
  refresh();  // the first /frame may have failed (or loaded) before this deferred script was listening
  setInterval(function () { fetch("/status").then(function (r) { return r.json(); }).then(show); }, 500);
})();
