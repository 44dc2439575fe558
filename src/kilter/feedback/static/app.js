// Keyboard shortcuts for the task pages. Loaded as a file (the Content-Security-Policy forbids
// inline scripts); pages work without it, with the mouse.
(function () {
  "use strict";

  var form = document.getElementById("task-form");
  if (!form) return;
  var task = form.dataset.task;
  var cards = Array.prototype.slice.call(document.querySelectorAll(".response[data-position]"));
  var statusLine = document.getElementById("key-status");
  var help = document.getElementById("shortcuts");
  var current = 0;
  var flagMode = false;
  var tieNext = false;
  var rankOrder = []; // ranking: [{pos, tied}] in the order the keys were pressed
  var submitted = false;

  function say(text) { if (statusLine) statusLine.textContent = text || ""; }
  function letter(pos) { return "ABCDEFGHI".charAt(pos); }

  function setCurrent(pos) {
    if (!cards.length) return;
    current = (pos + cards.length) % cards.length;
    cards.forEach(function (card, i) { card.classList.toggle("current", i === current); });
    if (flagMode) { openFlags(); showFlagTarget(); }
  }

  function openFlags() {
    var box = cards[current] && cards[current].querySelector("details.flags");
    if (box) box.open = true;
  }

  var flagBanner = document.getElementById("flag-banner");

  function setFlagMode(on) {
    flagMode = on && cards.length > 0;
    document.body.classList.toggle("flag-mode", flagMode);
    if (flagBanner) flagBanner.hidden = !flagMode;
    if (flagMode) {
      openFlags();
      showFlagTarget();
      say("Flag mode for response " + letter(current) + ": 1-9 toggle flags, / or Esc to leave.");
    } else {
      say("");
    }
  }

  function showFlagTarget() {
    var target = flagBanner && flagBanner.querySelector("[data-flag-target]");
    if (target) target.textContent = letter(current);
  }

  function updateFlagCounts() {
    cards.forEach(function (card) {
      var n = card.querySelectorAll("details.flags input:checked").length;
      var badge = card.querySelector("[data-flag-count]");
      if (badge) badge.textContent = n ? String(n) : "";
    });
  }

  function pick(input) {
    if (!input) return false;
    input.checked = true;
    input.dispatchEvent(new Event("change", { bubbles: true }));
    return true;
  }

  function clearMissing() {
    form.querySelectorAll(".missing").forEach(function (el) { el.classList.remove("missing"); });
  }

  function submitForm() {
    if (submitted) return;
    clearMissing();
    var bad = form.querySelector(":invalid:not(fieldset)");
    if (bad) {
      if (bad.tagName === "TEXTAREA") { bad.reportValidity(); return; } // typing there is the fix
      // Say what is missing without moving focus: focus inside a <select> or on a radio would
      // swallow the very shortcuts that fill the gap.
      var box = bad.closest("[data-missing-box]") || bad.closest(".response") || bad.parentNode;
      box.classList.add("missing");
      say(bad.dataset.missing || "Something is missing: see the highlighted field.");
      if (document.activeElement && document.activeElement !== document.body) document.activeElement.blur();
      return;
    }
    form.requestSubmit();
  }

  // ------------------------------------------------------------------ ranking

  function rankSelects() { return cards.map(function (c) { return c.querySelector("select[data-rank]"); }); }

  function writeRanks() {
    var selects = rankSelects();
    selects.forEach(function (s) { s.value = ""; });
    var rank = 0;
    rankOrder.forEach(function (entry, i) {
      if (!entry.tied || i === 0) rank = i + 1;
      selects[entry.pos].value = String(rank);
    });
    markRanked();
  }

  function markRanked() {
    rankSelects().forEach(function (s, i) { cards[i].classList.toggle("ranked", s.value !== ""); });
    showOrder();
  }

  // The order the ranks make, in words: "B > A = C" (unranked responses listed after).
  function showOrder() {
    var out = document.querySelector("[data-rank-order]");
    if (!out) return;
    var ranked = [];
    var unranked = [];
    rankSelects().forEach(function (s, pos) {
      if (s.value) ranked.push({ pos: pos, rank: Number(s.value) }); else unranked.push(letter(pos));
    });
    ranked.sort(function (a, b) { return a.rank - b.rank || a.pos - b.pos; });
    var text = ranked.map(function (r, i) {
      return (i === 0 ? "" : r.rank === ranked[i - 1].rank ? " = " : " > ") + letter(r.pos);
    }).join("");
    out.textContent = (text || "nothing ranked yet") + (unranked.length && text ? "   (not ranked: " + unranked.join(", ") + ")" : "");
  }

  // Drag a response onto another to put it in that one's place; the ranks follow the new order.
  function orderForDrag() {
    var selects = rankSelects();
    var ranked = rankOrder.map(function (e) { return e.pos; });
    selects.forEach(function (s, pos) { if (ranked.indexOf(pos) < 0) ranked.push(pos); });
    return ranked;
  }

  function dropOn(from, onto) {
    if (from === onto) return;
    var order = orderForDrag().filter(function (pos) { return pos !== from; });
    order.splice(order.indexOf(onto), 0, from);
    rankOrder = order.map(function (pos) { return { pos: pos, tied: false }; });
    writeRanks();
    setCurrent(from);
    say("Response " + letter(from) + " moved to rank " + (order.indexOf(from) + 1) + ".");
  }

  function enableDrag() {
    cards.forEach(function (card, pos) {
      card.setAttribute("draggable", "true");
      card.addEventListener("dragstart", function (ev) {
        ev.dataTransfer.setData("text/plain", String(pos));
        ev.dataTransfer.effectAllowed = "move";
        card.classList.add("dragging");
      });
      card.addEventListener("dragend", function () { card.classList.remove("dragging"); });
      card.addEventListener("dragover", function (ev) { ev.preventDefault(); card.classList.add("drop-target"); });
      card.addEventListener("dragleave", function () { card.classList.remove("drop-target"); });
      card.addEventListener("drop", function (ev) {
        ev.preventDefault();
        card.classList.remove("drop-target");
        var from = Number(ev.dataTransfer.getData("text/plain"));
        if (!isNaN(from)) dropOn(from, pos);
      });
    });
  }

  function readRanks() {
    // after a change with the mouse, rebuild the key order from the selects
    var selects = rankSelects();
    var ranked = [];
    selects.forEach(function (s, pos) { if (s.value) ranked.push({ pos: pos, rank: Number(s.value) }); });
    ranked.sort(function (a, b) { return a.rank - b.rank || a.pos - b.pos; });
    rankOrder = ranked.map(function (r, i) { return { pos: r.pos, tied: i > 0 && r.rank === ranked[i - 1].rank }; });
    markRanked();
  }

  function rankKey(pos) {
    var existing = rankOrder.findIndex(function (e) { return e.pos === pos; });
    if (existing >= 0) {
      rankOrder.splice(existing, 1);
      say("Response " + letter(pos) + " unranked.");
    } else {
      rankOrder.push({ pos: pos, tied: tieNext && rankOrder.length > 0 });
    }
    tieNext = false;
    writeRanks();
    setCurrent(pos);
    if (existing < 0) {
      var sel = rankSelects()[pos];
      say("Response " + letter(pos) + " ranked " + sel.value + ". Now give it a score (1-7).");
    }
  }

  function scoreKey(value) {
    var input = cards[current].querySelector('.score input[value="' + value + '"]');
    if (pick(input)) {
      say("Response " + letter(current) + " scored " + value + ".");
      var next = cards.findIndex(function (c, i) { return i > current && !c.querySelector(".score input:checked"); });
      if (next >= 0) setCurrent(next);
    }
  }

  // ------------------------------------------------------------------ plain text and long responses

  var rawButton = document.querySelector("[data-toggle-raw]");

  function toggleRaw() {
    var raw = !document.body.classList.contains("raw");
    document.body.classList.toggle("raw", raw);
    document.querySelectorAll(".response-raw").forEach(function (el) { el.hidden = !raw; });
    document.querySelectorAll(".md").forEach(function (el) { el.hidden = raw; });
    if (rawButton) rawButton.setAttribute("aria-pressed", String(raw));
    markScrolling();
    say(raw ? "Plain text: exactly as written. r for rendered." : "Rendered as Markdown. r for plain text.");
  }

  // A response taller than its box says so, so nobody judges the first screenful only.
  function markScrolling() {
    document.querySelectorAll("[data-scroll], .response-raw").forEach(function (el) {
      el.classList.toggle("scrolls", el.scrollHeight > el.clientHeight + 2);
    });
  }

  // ------------------------------------------------------------------ keys

  function typingIn(el) {
    if (!el) return false;
    var tag = el.tagName;
    if (tag === "TEXTAREA" || tag === "SELECT" || el.isContentEditable) return true;
    return tag === "INPUT" && ["radio", "checkbox", "hidden", "submit", "button", "reset"].indexOf(el.type) < 0;
  }

  // True when the focused control gives this key a meaning of its own: Enter and Space press a
  // button, follow a link or open a <summary>; Space and the arrow keys work a radio group or a
  // checkbox. Shortcuts leave those keys alone (Enter on a focused Skip button skips).
  function ownsKey(el, key) {
    if (!el || el === document.body) return false;
    var tag = el.tagName;
    var press = key === "Enter" || key === " ";
    if (tag === "BUTTON" || tag === "SUMMARY" || (tag === "A" && el.hasAttribute("href"))) return press;
    if (tag === "INPUT" && ["submit", "button", "reset"].indexOf(el.type) >= 0) return press;
    if (tag === "INPUT" && (el.type === "radio" || el.type === "checkbox")) {
      return key === " " || key.indexOf("Arrow") === 0 || (key === "Enter" && el.type === "checkbox");
    }
    return false;
  }

  document.addEventListener("keydown", function (ev) {
    if (ev.altKey || ev.metaKey && ev.key !== "Enter") return;
    var key = ev.key;
    var target = ev.target;
    if (typingIn(target)) {
      if (key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); submitForm(); }
      else if (key === "Escape") { target.blur(); }
      return;
    }
    if (ev.ctrlKey || ownsKey(target, key)) return;
    var handled = true;
    // a task's own answer keys (data-key, e.g. the clip task's l/r/e/c) come before the page-wide letters
    var keyed = form && key.length === 1 ? form.querySelector('input[data-key="' + CSS.escape(key) + '"]') : null;
    if (flagMode && /^[1-9]$/.test(key)) {
      var box = cards[current].querySelector('input[data-flag="' + key + '"]');
      if (box) { box.checked = !box.checked; updateFlagCounts(); }
    } else if (key === "/" ) {
      setFlagMode(!flagMode);
    } else if (key === "Escape") {
      if (flagMode) setFlagMode(false);
      else if (help && !help.hidden) help.hidden = true;
    } else if (key === "?") {
      if (help) help.hidden = !help.hidden;
    } else if (key === "ArrowRight" || key === "ArrowDown" && task === "ranking" || key === "j") {
      setCurrent(current + 1);
    } else if (key === "ArrowLeft" || key === "ArrowUp" && task === "ranking" || key === "k") {
      setCurrent(current - 1);
    } else if (key === "Enter") {
      if (task === "edit" || task === "demonstration") { handled = false; } else submitForm();
    } else if (keyed) {
      pick(keyed);
      say(keyed.closest("label").textContent.replace(/\s+/g, " ").trim() + " - press Enter to submit.");
    } else if (key === "h") {
      var history = document.querySelector("[data-history]");
      if (history) history.click();
    } else if (key === "r") {
      toggleRaw();
    } else if (key === "s") {
      var skip = document.querySelector("[data-skip]");
      if (skip && !submitted) skip.click();
    } else if (key === "m") {
      var comment = document.querySelector("[data-comment]");
      if (comment) comment.focus();
    } else if ((key === "e" && task === "edit") || (key === "w" && task === "demonstration")) {
      var main = document.querySelector("[data-main-text]");
      if (main) { main.focus(); main.setSelectionRange(main.value.length, main.value.length); }
    } else if (task === "ranking" && /^[a-i]$/.test(key) && "abcdefghi".indexOf(key) < cards.length) {
      rankKey("abcdefghi".indexOf(key));
    } else if (task === "ranking" && key === "=") {
      tieNext = rankOrder.length > 0;
      if (tieNext) say("The next response you press ties with the previous one.");
    } else if (task === "ranking" && key === "Backspace") {
      if (rankOrder.length) { var last = rankOrder.pop(); writeRanks(); say("Response " + letter(last.pos) + " unranked."); }
    } else if (task === "ranking" && /^[1-7]$/.test(key)) {
      scoreKey(key);
    } else {
      var input = form.querySelector('input[data-key="' + CSS.escape(key) + '"]');
      if (input) {
        pick(input);
        say(input.closest("label").textContent.replace(/\s+/g, " ").trim() + " - press Enter to submit.");
      } else {
        handled = false;
      }
    }
    if (handled) ev.preventDefault();
  });

  // ------------------------------------------------------------------ mouse and form

  cards.forEach(function (card, i) {
    card.addEventListener("mousedown", function () { setCurrent(i); });
  });
  form.addEventListener("change", function (ev) {
    var box = ev.target.closest(".missing");
    if (box) box.classList.remove("missing");
    if (ev.target.matches("select[data-rank]")) readRanks();
    if (ev.target.matches("details.flags input")) updateFlagCounts();
  });
  form.addEventListener("submit", function (ev) {
    if (submitted) { ev.preventDefault(); return; }
    submitted = true;
    var button = form.querySelector("[data-submit]");
    if (button) button.disabled = true;
    say("Saving...");
  });
  document.querySelectorAll("[data-toggle-help]").forEach(function (b) {
    b.addEventListener("click", function () { if (help) help.hidden = !help.hidden; });
  });

  // Edit task: the server's word diff of the edit so far (difflib), refreshed as the person types.
  var diffBox = document.querySelector("[data-diff-box]");
  var mainText = document.querySelector("[data-main-text]");
  var diffTimer = null;
  function refreshDiff() {
    var body = new FormData();
    body.append("csrf_token", form.querySelector('input[name="csrf_token"]').value);
    body.append("assignment_id", form.querySelector('input[name="assignment_id"]').value);
    body.append("text", mainText.value);
    fetch(form.action.replace(/\/submit$/, "/diff"), { method: "POST", body: body, credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (html !== null) diffBox.querySelector("[data-diff-out]").innerHTML = html;  // server-escaped
      });
  }
  if (diffBox && mainText && !diffBox.hidden) {
    mainText.addEventListener("input", function () {
      clearTimeout(diffTimer);
      diffTimer = setTimeout(refreshDiff, 400);
    });
  }

  if (rawButton) rawButton.addEventListener("click", toggleRaw);
  document.querySelectorAll("[data-scroll], .response-raw").forEach(function (el) {
    el.addEventListener("scroll", function () {
      el.classList.toggle("scrolled-to-end", el.scrollTop + el.clientHeight >= el.scrollHeight - 2);
    });
  });
  window.addEventListener("resize", markScrolling);
  markScrolling();
  setCurrent(0);
  updateFlagCounts();
  if (task === "ranking") { readRanks(); enableDrag(); }
})();
