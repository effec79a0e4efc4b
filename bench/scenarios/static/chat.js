// bench serve's chat page: send a message over the WebSocket, show the reply as its tokens arrive,
// list and reopen the stored conversations, export one. Every text from the user, the model or the
// store goes in through textContent, never innerHTML. The socket reconnects by itself after a
// server restart; the open conversation is in the address (#c=ID), so a reload reopens it.
(function () {
  "use strict";
  var $ = function (id) { return document.getElementById(id); };
  var ws = null, busy = false, current = null, replyEl = null, replyText = "", pending = "";

  function conversationFromHash() {
    var m = /^#c=([0-9a-f]+)$/.exec(location.hash);
    return m ? m[1] : null;
  }

  function status(text, state) {
    $("status").textContent = text;
    $("status").className = state;
    document.body.setAttribute("data-connected", state === "up" ? "1" : "0");
  }

  function showError(text) { $("error").textContent = text || ""; }

  function setBusy(on) {
    busy = on;
    $("send").disabled = on;
    $("stop").disabled = !on;
    document.body.setAttribute("data-busy", on ? "1" : "0");
  }

  function figures(s) {
    if (!s) return "";
    var parts = [];
    if (s.ttft_ms !== null && s.ttft_ms !== undefined) parts.push("TTFT " + Math.round(s.ttft_ms) + " ms");
    if (s.tok_s !== null && s.tok_s !== undefined) parts.push(s.tok_s.toFixed(1) + " tokens/s");
    parts.push(s.tokens + " tokens");
    if (s.finish_reason) parts.push(s.finish_reason);
    return parts.join(" · ");
  }

  function addMessage(role, text, stats) {
    var box = document.createElement("div");
    box.className = "message " + role;
    var who = document.createElement("div");
    who.className = "role";
    who.textContent = role;
    var body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    var meta = document.createElement("div");
    meta.className = "figures";
    meta.textContent = figures(stats);
    box.appendChild(who);
    box.appendChild(body);
    box.appendChild(meta);
    $("messages").appendChild(box);
    $("messages").scrollTop = $("messages").scrollHeight;
    return box;
  }

  function setCurrent(id) {
    current = id;
    if (id) {
      history.replaceState(null, "", "#c=" + id);
      $("export-md").href = "/chat/api/conversations/" + id + "/export?format=md";
      $("export-json").href = "/chat/api/conversations/" + id + "/export?format=json";
    } else {
      history.replaceState(null, "", location.pathname);
    }
    $("export").hidden = !id;
    Array.prototype.forEach.call(document.querySelectorAll("#conversations a"), function (a) {
      a.className = a.getAttribute("data-id") === id ? "current" : "";
    });
  }

  function refreshList() {
    return fetch("/chat/api/conversations").then(function (r) { return r.json(); }).then(function (data) {
      var list = $("conversations");
      list.textContent = "";
      data.conversations.forEach(function (c) {
        var li = document.createElement("li");
        var a = document.createElement("a");
        a.href = "#c=" + c.id;
        a.setAttribute("data-id", c.id);
        a.textContent = c.title;
        a.title = c.title;
        a.className = c.id === current ? "current" : "";
        a.addEventListener("click", function (e) { e.preventDefault(); open(c.id); });
        var n = document.createElement("small");
        n.textContent = " " + c.n_messages + " messages · " + c.updated_at.replace("T", " ").slice(0, 16);
        li.appendChild(a);
        li.appendChild(n);
        list.appendChild(li);
      });
    }).catch(function () { /* the server is away; the socket's reconnect refreshes it */ });
  }

  function open(id) {
    if (busy) return;
    showError("");
    return fetch("/chat/api/conversations/" + id).then(function (r) {
      if (!r.ok) throw new Error("no conversation " + id);
      return r.json();
    }).then(function (c) {
      $("messages").textContent = "";
      c.messages.forEach(function (m) { addMessage(m.role, m.content, m.stats); });
      setCurrent(id);
    }).catch(function (e) { showError(e.message); setCurrent(null); });
  }

  function options() {
    var o = {};
    [["temperature", parseFloat], ["top_p", parseFloat], ["max_tokens", function (v) { return parseInt(v, 10); }]]
      .forEach(function (f) {
        var v = f[1]($(f[0]).value);
        if (!isNaN(v)) o[f[0]] = v;
      });
    return o;
  }

  function send() {
    var text = $("input").value;
    if (busy) return;
    if (!ws || ws.readyState !== WebSocket.OPEN) { showError("not connected to the server yet"); return; }
    showError("");
    setBusy(true);
    pending = text;
    ws.send(JSON.stringify({type: "send", conversation: current, content: text, options: options()}));
  }

  function onMessage(ev) {
    var m = JSON.parse(ev.data);
    if (m.type === "hello") {
      $("model").textContent = m.model;
      ["temperature", "top_p", "max_tokens"].forEach(function (k) {
        if ($(k).value === "") $(k).value = m.defaults[k];
      });
      $("max_tokens").max = m.block_size;
    } else if (m.type === "start") {
      addMessage("user", pending, null);
      $("input").value = "";
      setCurrent(m.conversation);
      replyText = "";
      replyEl = addMessage("assistant", "", null);
      refreshList();
    } else if (m.type === "token") {
      replyText += m.text;
      replyEl.querySelector(".text").textContent = replyText;
      replyEl.setAttribute("data-tokens", String(Number(replyEl.getAttribute("data-tokens") || "0") + 1));
      $("messages").scrollTop = $("messages").scrollHeight;
    } else if (m.type === "done") {
      replyText += m.text;
      replyEl.querySelector(".text").textContent = replyText;
      replyEl.querySelector(".figures").textContent = figures(m.stats);
      replyEl.setAttribute("data-done", "1");
      setBusy(false);
      refreshList();
    } else if (m.type === "error") {
      showError(m.message);
      setBusy(false);
      refreshList();
    }
  }

  function connect() {
    var scheme = location.protocol === "https:" ? "wss://" : "ws://";
    ws = new WebSocket(scheme + location.host + "/chat/ws");
    ws.onopen = function () { status("connected", "up"); showError(""); refreshList(); };
    ws.onmessage = onMessage;
    ws.onclose = function () {
      status("reconnecting…", "down");
      if (busy) { setBusy(false); showError("the connection dropped mid-reply; the part generated is kept"); }
      setTimeout(connect, 1000);  // the server restarts: try again every second
    };
  }

  $("compose").addEventListener("submit", function (e) { e.preventDefault(); send(); });
  $("input").addEventListener("keydown", function (e) {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", function () {
    if (ws && busy) ws.send(JSON.stringify({type: "stop"}));
  });
  $("new").addEventListener("click", function () {
    if (busy) return;
    $("messages").textContent = "";
    setCurrent(null);
    showError("");
    $("input").focus();
  });
  var start = conversationFromHash();
  if (start) open(start);
  connect();
}());
