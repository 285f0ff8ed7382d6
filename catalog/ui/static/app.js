// Keyboard for the review UI. Loaded from this origin only (the CSP forbids inline scripts).
(function () {
  "use strict";
  function typing(el) {
    return el && (el.tagName === "INPUT" && el.type !== "checkbox" && el.type !== "radio" || el.tagName === "TEXTAREA" || el.tagName === "SELECT");
  }
  function go(id) { var a = document.getElementById(id); if (a) { window.location.href = a.href; } }
  // k inside a review queue: the page before, when it was a card of the same queue (the neuron just
  // saved or skipped); otherwise the #prev link (the neuron skipped last, or the numeric neighbour).
  function back() {
    var nav = document.getElementById("neighbours");
    var card = document.getElementById("card");
    if (nav && card && nav.dataset.queue && document.referrer && window.history.length > 1) {
      try {
        var ref = new URL(document.referrer);
        var here = new URL(window.location.href);
        var prefix = "/models/" + encodeURIComponent(card.dataset.model) + "/neurons/";
        if (ref.origin === here.origin && ref.pathname.indexOf(prefix) === 0 && ref.pathname !== here.pathname &&
            ref.searchParams.get("queue") === here.searchParams.get("queue")) {
          window.history.back();
          return;
        }
      } catch (e) { /* an unreadable referrer: fall back to the link */ }
    }
    go("prev");
  }
  document.addEventListener("keydown", function (ev) {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) { return; }
    var form = document.getElementById("annotate-form");
    var desc = document.getElementById("description");
    var active = document.activeElement;
    if (ev.key === "Escape") {
      if (typing(active)) { active.blur(); }
      var help = document.getElementById("help");
      if (help) { help.hidden = true; }
      return;
    }
    if (typing(active)) { return; } // keys type text there; Enter submits the form natively
    if (ev.key === "/" && document.getElementById("q")) { ev.preventDefault(); document.getElementById("q").focus(); return; }
    if (ev.key === "?") { var h = document.getElementById("help"); if (h) { h.hidden = !h.hidden; } return; }
    if (ev.key === "j") { go("next"); return; }
    if (ev.key === "k") { back(); return; }
    if (ev.key === "n") { go("skip"); return; }
    if (!form) { return; }
    var radio = form.querySelector('input[type=radio][data-key="' + ev.key + '"]');
    if (radio) {
      ev.preventDefault();
      radio.checked = true;
      if (desc) { desc.focus(); desc.setSelectionRange(desc.value.length, desc.value.length); }
      return;
    }
    if (ev.key === "e" && desc) { ev.preventDefault(); desc.focus(); return; }
    if (ev.key === "x" && active && active.type === "checkbox") { ev.preventDefault(); active.checked = !active.checked; return; }
    if (ev.key === "Enter" && active && active.type === "checkbox") { ev.preventDefault(); form.requestSubmit(); }
  });
  // A label must be chosen before Enter saves: say so instead of a round trip.
  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    if (form.id !== "annotate-form") { return; }
    if (!form.querySelector("input[name=label]:checked")) {
      ev.preventDefault();
      var p = document.getElementById("form-error") || document.createElement("p");
      p.id = "form-error"; p.className = "error"; p.setAttribute("role", "alert");
      p.textContent = "Choose a label first: 1 shallow, 2 semantic, 3 both, 0 none.";
      form.prepend(p);
    }
  });
}());
