// bench dashboard: keep the page's fragments live from the server's event stream.
// The server renders every fragment (values escaped there); this script only swaps them in.
(function () {
  "use strict";
  var view = document.body.getAttribute("data-view");
  var badge = document.getElementById("live");
  if (!view || view === "none") {
    badge.textContent = "static";
    return;
  }
  function show(text, state) {
    badge.textContent = text;
    badge.className = "live " + state;
  }
  function apply(fragments) {
    Object.keys(fragments).forEach(function (id) {
      var el = document.getElementById(id);
      if (el) el.innerHTML = fragments[id];
    });
    var n = Number(document.body.getAttribute("data-updates") || "0") + 1;
    document.body.setAttribute("data-updates", String(n));
    show("live · updated " + new Date().toLocaleTimeString(), "on");
  }
  function connect() {
    var source = new EventSource("/events?view=" + encodeURIComponent(view));
    source.addEventListener("update", function (e) { apply(JSON.parse(e.data).fragments); });
    source.addEventListener("problem", function (e) { show(JSON.parse(e.data), "off"); });
    source.onerror = function () {
      show("reconnecting…", "off");
      // The browser retries by itself after a dropped stream; a refused one closes it, so retry here.
      if (source.readyState === EventSource.CLOSED) setTimeout(connect, 1000);
    };
  }
  connect();
})();
