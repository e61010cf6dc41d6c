/* Polar Cloud page for Klipper (served at /polar-cloud/ next to Mainsail or
 * Fluidd). It talks only to Moonraker on this origin:
 *   - JSON-RPC on /websocket: printer.objects.subscribe for live
 *     printer.polar_cloud status, notify_gcode_response for the module's
 *     console lines;
 *   - HTTP POST /printer/polar_cloud/register, /unregister and
 *     /plate_cleared;
 *   - while the websocket is down, GET /printer/objects/query?polar_cloud
 *     every 2 s.
 * Text from Klipper or the cloud is only ever set with textContent. Nothing
 * is stored in the browser; the PIN field is emptied as soon as it is sent.
 */
"use strict";

(function () {
  const POLL_MS = 2000;
  const MAX_MESSAGES = 100;
  const RPC_TIMEOUT_MS = 20000;
  const STARTING_MS = 3000;

  const STATE_LABELS = {
    unregistered: "Not registered",
    connecting: "Connecting",
    registering: "Registering",
    authenticating: "Signing in",
    online: "Online",
    backoff: "Offline, retrying",
    auth_failed: "Sign-in refused",
    disabled: "Disabled",
  };
  const STATUS_CODES = {
    0: "idle", 1: "local print", 2: "preparing", 3: "printing", 4: "paused",
    6: "cancelling", 7: "complete", 9: "paused, heater off",
    10: "changing filament", 12: "error", 13: "offline",
    15: "waiting for the build plate to be cleared",
  };
  const BUSY_STATES = ["connecting", "registering", "authenticating"];

  const $ = (id) => document.getElementById(id);
  const ui = {
    link: $("link"), linkText: $("link-text"), state: $("state"),
    serial: $("serial"), server: $("server"), onlineSince: $("online-since"),
    job: $("job"), retryRow: $("retry-row"), retry: $("retry"),
    errorRow: $("error-row"), lastError: $("last-error"),
    registerCard: $("register-card"), form: $("register-form"),
    email: $("email"), pin: $("pin"), registerButton: $("register-button"),
    unregisterCard: $("unregister-card"), unregisterButton: $("unregister-button"),
    plateCard: $("plate-card"), plateButton: $("plate-button"),
    confirm: $("confirm"), confirmSerial: $("confirm-serial"), force: $("force"),
    messages: $("messages"), clearMessages: $("clear-messages"),
  };

  // What we know. pc: the printer.polar_cloud object, null before the first
  // answer; missing: Klipper answered without it (no [polar_cloud] section).
  let pc = null;
  let missing = false;
  let busy = false;
  let retryDeadline = 0;
  let startedAt = 0;        // a registration was accepted at this time
  let registeredHere = false; // ...by this page: note where the PIN went

  const PIN_NOTE = "Note: the PIN went through Moonraker and Klipper, and " +
    "Klipper copies its recent requests into klippy.log when it shuts down " +
    "soon after. Next time, register from the printer's shell with " +
    "polar_cloud/scripts/register.sh --email <e-mail>: it asks for the PIN " +
    "and keeps it out of every log and history (it also registers every " +
    "printer of a host at once; see the README).";

  // ------------------------------------------------------------ messages

  function addMessage(text, kind) {
    const li = document.createElement("li");
    li.dataset.kind = kind || "info";
    const time = document.createElement("time");
    const now = new Date();
    time.dateTime = now.toISOString();
    time.textContent = now.toLocaleTimeString([], { hour12: false });
    const span = document.createElement("span");
    span.textContent = text;
    li.append(time, span);
    ui.messages.append(li);
    while (ui.messages.children.length > MAX_MESSAGES) {
      ui.messages.firstElementChild.remove();
    }
    ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  // Console lines from klippy ("// text" or "!! text"): keep ours.
  function consoleLines(raw) {
    for (const line of String(raw).split("\n")) {
      let text = line;
      let kind = "info";
      if (text.startsWith("!! ")) {
        text = text.slice(3);
        kind = "error";
      } else if (text.startsWith("// ")) {
        text = text.slice(3);
      } else if (text.startsWith("!!")) {
        text = text.slice(2);
        kind = "error";
      }
      text = text.trim();
      if (!/^(Polar Cloud|POLAR_)/.test(text)) continue;
      // The module's own note is for the console; the page says it below
      if (/^Polar Cloud: note: the PIN/.test(text)) continue;
      if (kind === "info" && /(failed|refused|rejected|not accepted|cannot|error)/i.test(text)) {
        kind = "error";
      } else if (kind === "info" && /(registered, serial number|online as|unregistered|build plate cleared)/.test(text)) {
        kind = "ok";
      }
      addMessage(text, kind);
      if (/registration failed/.test(text)) registeredHere = false;
      if (kind === "ok" && registeredHere && /registered, serial number/.test(text)) {
        registeredHere = false;
        addMessage(PIN_NOTE, "note");
      }
    }
  }

  // ------------------------------------------------------------ errors

  // Moonraker/klippy error text in plain words.
  function plainError(code, message) {
    const msg = String(message || "").trim();
    if (code === 401 || code === 403) {
      return "Moonraker refused the request (not authorized). Open this page " +
        "from a network listed in Moonraker's trusted_clients, or log in through " +
        "Mainsail/Fluidd first.";
    }
    if (code === 503 || /klippy (host )?(not connected|disconnected)|klippy.*not ready/i.test(msg)) {
      return "Klipper is not connected to Moonraker right now. Check that Klipper is running.";
    }
    if (code === 404 || /method not found|not found/i.test(msg)) {
      return "Klipper does not know Polar Cloud: add a [polar_cloud] section to " +
        "printer.cfg and restart Klipper.";
    }
    const missingArg = /^Missing Argument \[(\w+)\]$/i.exec(msg);
    if (missingArg) {
      return "Please fill in the " + (missingArg[1] === "pin" ? "PIN" : missingArg[1]) + ".";
    }
    if (msg) return msg.charAt(0).toUpperCase() + msg.slice(1);
    return "Moonraker answered with error " + code + ".";
  }

  class ApiError extends Error {}

  async function api(method, path, body) {
    const init = { method, cache: "no-store", credentials: "same-origin", headers: {} };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (e) {
      throw new ApiError("Moonraker cannot be reached. Check that it is running.");
    }
    let data = null;
    try {
      data = await resp.json();
    } catch (e) {
      data = null;
    }
    if (!resp.ok || !data || data.error) {
      const err = (data && data.error) || {};
      throw new ApiError(plainError(err.code || resp.status, err.message));
    }
    return data.result;
  }

  // ------------------------------------------------------------ rendering

  function setLink(kind, text) {
    ui.link.dataset.link = kind;
    ui.linkText.textContent = text;
  }

  function setText(el, text) {
    el.textContent = text === "" || text === null || text === undefined ? "—" : String(text);
  }

  function jobText(st) {
    const id = String(st.job_id === undefined ? "" : st.job_id);
    const code = STATUS_CODES[st.status_code];
    if (st.state !== "online") return "—";
    if (id === "" || id === "0") return code ? "none (" + code + ")" : "none";
    const what = id === "123" ? "local print" : "cloud job " + id;
    return code ? what + " (" + code + ")" : what;
  }

  function sinceText(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    return isNaN(d.getTime()) ? iso : d.toLocaleString();
  }

  function render() {
    const st = pc;
    let state = "unknown";
    let label = "Unknown";
    if (missing) {
      state = "missing";
      label = "Not configured";
    } else if (st) {
      state = String(st.state);
      label = STATE_LABELS[state] || state;
    }
    ui.state.dataset.state = state;
    ui.state.textContent = label;
    ui.state.title = "state: " + state;
    document.title = "Polar Cloud · " + label;

    if (!st || missing) {
      for (const el of [ui.serial, ui.server, ui.onlineSince, ui.job]) setText(el, "");
      ui.retryRow.hidden = true;
      ui.errorRow.hidden = true;
      ui.registerCard.hidden = true;
      ui.unregisterCard.hidden = true;
      ui.plateCard.hidden = true;
      return;
    }
    setText(ui.serial, st.serial_number || (st.registered ? "" : "not registered"));
    ui.serial.classList.toggle("muted", !st.serial_number);
    setText(ui.server, st.server);
    setText(ui.onlineSince, st.state === "online" ? sinceText(st.online_since) : "");
    setText(ui.job, jobText(st));
    ui.retryRow.hidden = st.state !== "backoff";
    renderRetry();
    ui.errorRow.hidden = !st.last_error;
    setText(ui.lastError, st.last_error);

    const canRegister = !st.registered || st.state === "auth_failed";
    ui.registerCard.hidden = !canRegister;
    ui.unregisterCard.hidden = !st.registered;
    if (st.state !== "unregistered") startedAt = 0;
    const starting = startedAt && Date.now() - startedAt < STARTING_MS;
    const pending = !st.registered && (starting || BUSY_STATES.includes(st.state));
    ui.registerButton.disabled = busy || pending;
    ui.registerButton.textContent = busy || pending ? "Registering…" : "Register";
    ui.unregisterButton.disabled = busy;
    // Only with require_plate_clear does the plate ever count as not clear
    ui.plateCard.hidden = st.plate_clear !== false;
    ui.plateButton.disabled = busy;
  }

  function renderRetry() {
    if (!pc || pc.state !== "backoff") return;
    const left = Math.max(0, Math.round((retryDeadline - Date.now()) / 1000));
    ui.retry.textContent = left > 0 ? "in about " + left + " s" : "now";
  }
  setInterval(renderRetry, 1000);

  function applyStatus(fields, full) {
    if (!fields) return;
    const before = pc ? pc.state : null;
    pc = full || !pc ? Object.assign({}, fields) : Object.assign({}, pc, fields);
    missing = false;
    if ("retry_in" in fields || "state" in fields) {
      retryDeadline = Date.now() + (Number(pc.retry_in) || 0) * 1000;
    }
    // (an unregistered printer in backoff is retrying a registration; the
    // console line says so)
    if (before && before !== pc.state && pc.state === "backoff" && pc.last_error
        && pc.registered) {
      addMessage("Polar Cloud connection lost: " + pc.last_error, "error");
    }
    render();
  }

  // ------------------------------------------------------------ websocket

  let ws = null;
  let wsDelay = 1000;
  let nextId = 1;
  const pending = new Map();
  let pollTimer = null;

  function wsUrl() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    return proto + "//" + location.host + "/websocket";
  }

  function rpc(method, params) {
    return new Promise((resolve, reject) => {
      if (!ws || ws.readyState !== WebSocket.OPEN) {
        reject(new ApiError("Moonraker is not connected."));
        return;
      }
      const id = nextId++;
      const timer = setTimeout(() => {
        pending.delete(id);
        reject(new ApiError("Moonraker did not answer in time."));
      }, RPC_TIMEOUT_MS);
      pending.set(id, { resolve, reject, timer });
      const msg = { jsonrpc: "2.0", method, id };
      if (params !== undefined) msg.params = params;
      ws.send(JSON.stringify(msg));
    });
  }

  function onMessage(ev) {
    let msg;
    try {
      msg = JSON.parse(ev.data);
    } catch (e) {
      return;
    }
    if (msg.id !== undefined && pending.has(msg.id)) {
      const p = pending.get(msg.id);
      pending.delete(msg.id);
      clearTimeout(p.timer);
      if (msg.error) p.reject(new ApiError(plainError(msg.error.code, msg.error.message)));
      else p.resolve(msg.result);
      return;
    }
    const params = msg.params || [];
    switch (msg.method) {
      case "notify_status_update":
        if (params[0] && params[0].polar_cloud) applyStatus(params[0].polar_cloud, false);
        break;
      case "notify_gcode_response":
        consoleLines(params[0]);
        break;
      case "notify_klippy_ready":
        subscribe();
        break;
      case "notify_klippy_shutdown":
        setLink("klippy", "Klipper is shut down");
        break;
      case "notify_klippy_disconnected":
        setLink("klippy", "Klipper is not connected");
        pc = null;
        render();
        break;
      default:
        break;
    }
  }

  async function subscribe() {
    try {
      const res = await rpc("printer.objects.subscribe", { objects: { polar_cloud: null } });
      const status = (res && res.status) || {};
      if (status.polar_cloud) {
        applyStatus(status.polar_cloud, true);
      } else {
        pc = null;
        missing = true;
        render();
        addMessage("Klipper has no [polar_cloud] section: add it to printer.cfg and restart Klipper.", "error");
      }
      setLink("ready", "Connected to Moonraker");
    } catch (e) {
      let state = "";
      try {
        state = (await rpc("server.info")).klippy_state;
      } catch (e2) {
        state = "";
      }
      setLink("klippy", state ? "Klipper is " + state + "; waiting for it" : e.message);
    }
  }

  function openSocket() {
    setLink("connecting", "Connecting to Moonraker…");
    let sock;
    try {
      sock = new WebSocket(wsUrl());
    } catch (e) {
      socketClosed(null);
      return;
    }
    ws = sock;
    sock.addEventListener("open", async () => {
      wsDelay = 1000;
      stopPolling();
      try {
        await rpc("server.connection.identify", {
          client_name: "polar_cloud", version: "1", type: "web", url: location.href,
        });
      } catch (e) {
        // Older Moonraker or no need to identify: carry on.
      }
      subscribe();
    });
    sock.addEventListener("message", onMessage);
    sock.addEventListener("close", () => socketClosed(sock));
  }

  function socketClosed(sock) {
    if (sock && ws !== sock) return;
    ws = null;
    for (const [id, p] of pending) {
      clearTimeout(p.timer);
      p.reject(new ApiError("The Moonraker connection closed."));
      pending.delete(id);
    }
    setLink("down", "No live link to Moonraker; retrying…");
    startPolling();
    setTimeout(openSocket, wsDelay);
    wsDelay = Math.min(wsDelay * 2, 30000);
  }

  // Fallback while the websocket is down.
  async function pollOnce() {
    try {
      const res = await api("GET", "/printer/objects/query?polar_cloud");
      const status = (res && res.status) || {};
      if (status.polar_cloud) applyStatus(status.polar_cloud, true);
    } catch (e) {
      // the link text already says we are reconnecting
    }
  }

  function startPolling() {
    if (pollTimer === null) {
      pollTimer = setInterval(pollOnce, POLL_MS);
      pollOnce();
    }
  }

  function stopPolling() {
    if (pollTimer !== null) {
      clearInterval(pollTimer);
      pollTimer = null;
    }
  }

  // ------------------------------------------------------------ actions

  function invalid(input, message) {
    input.setAttribute("aria-invalid", "true");
    input.focus();
    addMessage(message, "error");
  }

  ui.form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    ui.email.removeAttribute("aria-invalid");
    ui.pin.removeAttribute("aria-invalid");
    const email = ui.email.value.trim();
    if (!email || !ui.email.validity.valid) {
      invalid(ui.email, "Enter the e-mail address of your polar3d.com account.");
      return;
    }
    if (!ui.pin.value.trim()) {
      invalid(ui.pin, "Enter the PIN from your polar3d.com account settings.");
      return;
    }
    const pin = ui.pin.value.trim();
    ui.pin.value = "";
    busy = true;
    render();
    addMessage("Registering this printer as " + email + "…", "info");
    try {
      const token = await requestToken();
      await api("POST", "/printer/polar_cloud/register", { email, pin, token });
      registeredHere = true;
      // Keep the button off until the new state arrives (the result itself
      // follows as console lines).
      startedAt = Date.now();
      setTimeout(render, STARTING_MS);
    } catch (e) {
      addMessage("Registration not started: " + e.message, "error");
    } finally {
      busy = false;
      render();
    }
  });

  // The module accepts register and unregister only with the token that a
  // read of its status gives, which a page on another origin cannot read.
  async function requestToken() {
    const st = await api("GET", "/printer/polar_cloud/status");
    return (st && st.token) || "";
  }

  async function unregister(force) {
    busy = true;
    render();
    addMessage(force ? "Unregistering (forgetting it here in any case)…" : "Unregistering…", "info");
    try {
      const token = await requestToken();
      await api("POST", "/printer/polar_cloud/unregister", { force, token });
    } catch (e) {
      addMessage("Unregister failed: " + e.message, "error");
    } finally {
      busy = false;
      render();
    }
  }

  ui.unregisterButton.addEventListener("click", () => {
    const serial = (pc && pc.serial_number) || "";
    if (typeof ui.confirm.showModal !== "function") {
      if (window.confirm("Unregister printer " + serial + " from Polar Cloud?")) unregister(false);
      return;
    }
    ui.confirmSerial.textContent = serial;
    ui.force.checked = false;
    ui.confirm.returnValue = "";
    ui.confirm.showModal();
  });

  ui.confirm.addEventListener("close", () => {
    if (ui.confirm.returnValue === "unregister") unregister(ui.force.checked);
    ui.unregisterButton.focus();
  });

  ui.plateButton.addEventListener("click", async () => {
    busy = true;
    render();
    try {
      const token = await requestToken();
      await api("POST", "/printer/polar_cloud/plate_cleared", { token });
    } catch (e) {
      addMessage("Could not confirm the build plate: " + e.message, "error");
    } finally {
      busy = false;
      render();
    }
  });

  ui.clearMessages.addEventListener("click", () => ui.messages.replaceChildren());

  render();
  openSocket();
})();
