// ebbcast.js: a WebSocket client for ebbcast, as an ES module with no dependencies.
//
//   import { EbbcastClient } from "/ebbcast.js";
//   const client = new EbbcastClient("wss://example.org/ws");
//   client.addEventListener("message", (e) => console.log(e.detail.from, e.detail.text));
//   client.addEventListener("notrecovered", () => reloadState());
//   client.connect();
//
// What it does for you:
// - reconnects after a dropped connection with jittered exponential backoff
//   (full jitter from 0.5 s, doubling, capped at 30 s);
// - on a shutdown frame (the server drains, or an upgrade hands over), moves:
//   after reconnect_after_ms it opens a new connection and closes the old one
//   only once the new one is welcomed (make before break); a drain's frame may
//   name other instances (`nodes`, with the Redis backplane): the move goes to
//   one of them, keeping this URL's path and query;
// - resumes: every new connection asks for the broadcasts after the last offset
//   it delivered (?since=N&epoch=E), so a move or a dropped connection costs no
//   message; "message" fires once per broadcast, in order, even when the old and
//   the new connection of a move both deliver it. When the server cannot replay
//   what was missed, "notrecovered" fires: reload the application's state.
// - channels: subscribe(channel, {presence}) now and on every later connection,
//   each from the last offset it delivered in that channel (one resume point per
//   channel beside the global one); publish(channel, text); unsubscribe(channel).
//   "message" fires once per channel message too ({channel, ...} in detail).
// - sends a client token when the server asks for one: options.token is a
//   string, or a function returning one (or a Promise of one), called before
//   every connection so an application can hand out a fresh token; it goes in
//   the URL as ?token= (a browser cannot set headers on a WebSocket). A token
//   that expires closes the connection with 4001, and the next one asks again.
//
// Events (CustomEvent; the frame itself, or what is named, in `detail`):
//   "state"        {state, retryInMs}: "connecting", "connected", "reconnecting",
//                  "disconnected" (a move keeps "connected")
//   "welcome"      the welcome frame (also after a move or a reconnect)
//   "message"      a broadcast, or a channel's message (`channel` set), once, in
//                  offset order
//   "recovered"    {missed, since, channel}: a resume replayed what was missed
//   "notrecovered" {since, epoch, channel}: messages may have been missed
//                  (`channel` null for the global stream)
//   "epoch"        the epoch frame: the server's history (or a channel's) was lost
//   "subscribed", "unsubscribed", "join", "leave", "direct", "error": those frames
//   "shutdown"     the shutdown frame, {frame, moveInMs} in detail
//   "moving"       {inMs}: a move will start; "moved" {url}: it is done
//   "frame"        every frame delivered, of any type (after the typed event)
//   "binary"       {data: ArrayBuffer} (the raw envelope)
//   "closed"       {code, reason}: the connection in use closed

const DEFAULTS = {
  backoffBaseMs: 500,
  backoffCapMs: 30000,
  connectTimeoutMs: 10000,
  stableResetMs: 15000, // a connection this old resets backoff even without a welcome
  resume: true,
  token: null,  // a string, or () => string | Promise<string>
};

// The frames that fire an event of their own type.
const TYPED = ["welcome", "message", "epoch", "subscribed", "unsubscribed", "join", "leave",
  "direct", "error"];

function fullJitter(attempt, options) {
  const ceiling = Math.min(options.backoffCapMs, options.backoffBaseMs * Math.pow(2, attempt));
  return Math.random() * ceiling;
}

export class EbbcastClient extends EventTarget {
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.options = Object.assign({}, DEFAULTS, options);
    this.state = "disconnected";
    this.epoch = null;      // of the last broadcast delivered
    this.offset = 0;        // the last broadcast delivered
    this.clientId = null;
    this.server = null;
    this._ws = null;        // the connection in use
    this._wsConn = null;    // its bookkeeping (welcomed, ...)
    this._pending = null;   // a connection opened to move to
    this._attempt = 0;      // reconnect backoff
    this._moveAttempt = 0;  // move backoff
    this._retryTimer = null;
    this._moveTimer = null;
    this._wanted = false;
    this._fetching = false; // waiting for options.token()
    // channel -> {epoch, offset, presence, since}: since is the offset a resume
    // asked from, until the answer
    this.channels = new Map();
  }

  // Subscribe to a channel now (if connected) and on every later connection,
  // from the last offset delivered in it; {presence: true} for joins and leaves.
  subscribe(channel, options = {}) {
    const known = this.channels.get(channel);
    const state = known || { epoch: null, offset: 0, presence: false, since: null };
    state.presence = !!options.presence;
    this.channels.set(channel, state);
    if (this._welcomed()) this._sendSubscribe(this._ws, channel, state);
  }

  unsubscribe(channel) {
    this.channels.delete(channel);
    return this._command({ type: "unsubscribe", channel: channel });
  }

  publish(channel, text) {
    return this._command({ type: "publish", channel: channel, text: String(text) });
  }

  _command(command) {
    return this._welcomed() && this.send(JSON.stringify(command));
  }

  _welcomed() {
    return this.connected && !!this._wsConn && this._wsConn.welcomed;
  }

  _sendSubscribe(sock, channel, state) {
    const command = { type: "subscribe", channel: channel };
    if (this.options.resume && state.epoch !== null) {
      command.since = state.offset;
      command.epoch = state.epoch;
      state.since = state.offset;
    }
    if (state.presence) command.presence = true;
    sock.send(JSON.stringify(command));
  }

  // Start (again); idempotent while connected.
  connect() {
    this._wanted = true;
    if (this._ws || this._retryTimer || this._fetching) return;
    this._attempt = 0;
    this._open(false);
  }

  // Stop for good: no reconnect, no move.
  close(code = 1000, reason = "client disconnect") {
    this._wanted = false;
    clearTimeout(this._retryTimer);
    clearTimeout(this._moveTimer);
    this._retryTimer = this._moveTimer = null;
    for (const sock of [this._pending, this._ws]) {
      if (sock) this._drop(sock, code, reason);
    }
    this._ws = this._pending = null;
    this._setState("disconnected");
  }

  // Send a text (or binary) frame on the connection in use; false if none is open.
  send(data) {
    if (!this._ws || this._ws.readyState !== WebSocket.OPEN) return false;
    this._ws.send(data);
    return true;
  }

  get connected() {
    return !!this._ws && this._ws.readyState === WebSocket.OPEN;
  }

  resumeUrl(token = null) {
    const resuming = this.options.resume && this.epoch !== null;
    if (!resuming && !token) return this.url;
    const base = typeof location === "undefined" ? undefined : location.href;
    const url = new URL(this.url, base);  // "/ws" is fine in a page
    if (resuming) {
      url.searchParams.set("since", String(this.offset));
      url.searchParams.set("epoch", this.epoch);
    }
    if (token) url.searchParams.set("token", token);
    return url.toString();
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail: detail }));
  }

  _setState(state, retryInMs) {
    if (state === this.state && retryInMs === undefined) return;
    this.state = state;
    this._emit("state", { state: state, retryInMs: retryInMs });
  }

  _drop(sock, code, reason) {
    sock.onopen = sock.onmessage = sock.onerror = sock.onclose = null;
    try { sock.close(code, reason); } catch (e) { /* already closing */ }
  }

  _open(moving) {
    const token = this.options.token;
    if (typeof token !== "function") {
      this._openWith(moving, token);
      return;
    }
    const failed = () => {
      this._fetching = false;
      if (moving) { this._scheduleMove(null); } else { this._scheduleRetry(null); }
    };
    if (!moving) this._setState("connecting");
    this._fetching = true;
    Promise.resolve().then(token).then((value) => {
      this._fetching = false;
      if (!this._wanted || (moving && !this._ws)) return;
      this._openWith(moving, value);
    }, failed);
  }

  _openWith(moving, token) {
    let sock;
    const since = this.options.resume && this.epoch !== null ? this.offset : null;
    try {
      sock = new WebSocket(this.resumeUrl(token));
    } catch (e) {
      if (moving) { this._scheduleMove(null); } else { this._scheduleRetry(null); }
      return;
    }
    sock.binaryType = "arraybuffer";
    const conn = { welcomed: false, shutdown: null, openedAt: 0, since: since };
    if (moving) {
      this._pending = sock;
    } else {
      this._ws = sock;
      this._wsConn = conn;
      this._setState("connecting");
    }
    const timer = setTimeout(() => {
      if (sock.readyState === WebSocket.CONNECTING) sock.close();
    }, this.options.connectTimeoutMs);
    sock.onopen = () => {
      clearTimeout(timer);
      conn.openedAt = Date.now();
      if (this._ws === sock) this._setState("connected");
    };
    sock.onmessage = (ev) => this._onFrame(sock, conn, ev.data);
    sock.onclose = (ev) => {
      clearTimeout(timer);
      this._onClose(sock, conn, ev);
    };
  }

  _onFrame(sock, conn, data) {
    if (this._pending === sock) {  // its first frame, the welcome: it takes over
      const old = this._ws;
      this._ws = sock;
      this._wsConn = conn;
      this._pending = null;
      this._moveAttempt = 0;
      if (old) this._drop(old, 1000, "moved");
      this._emit("moved", { url: sock.url });
      this._setState("connected");
    }
    if (this._ws !== sock) return;
    if (typeof data !== "string") {
      this._emit("binary", { data: data });
      return;
    }
    let frame = null;
    try { frame = JSON.parse(data); } catch (e) { frame = null; }
    if (!frame || typeof frame !== "object" || typeof frame.type !== "string") {
      this._emit("frame", { type: "raw", text: data });
      return;
    }
    const accepted = typeof frame.channel === "string" ? this._acceptChannel(frame)
      : this._accept(conn, frame);
    if (!accepted) return;  // a message delivered already
    if (frame.type === "shutdown") {
      conn.shutdown = frame;
      this._followNodes(frame);
      const inMs = this._scheduleMove(frame);
      this._emit("shutdown", { frame: frame, moveInMs: inMs });
    } else if (TYPED.includes(frame.type)) {
      this._emit(frame.type, frame);
    }
    this._emit("frame", frame);
    if (frame.type === "welcome") {  // a new connection: every channel again
      for (const [channel, state] of this.channels) this._sendSubscribe(sock, channel, state);
    }
  }

  // A channel's frame: its own offsets; false for one delivered already, or from
  // a channel left.
  _acceptChannel(frame) {
    const state = this.channels.get(frame.channel);
    if (!state) return frame.type !== "message";
    if (frame.type === "subscribed") {
      const asked = state.since;
      state.since = null;
      const recovered = asked !== null && frame.recovered === true;
      if (recovered) {
        this._emit("recovered", { missed: Number(frame.missed) || 0, since: asked,
                                  channel: frame.channel });
      } else {
        if (asked !== null) {
          this._emit("notrecovered", { since: asked, epoch: state.epoch, channel: frame.channel });
        }
        const offset = Number(frame.offset) || 0;
        state.offset = String(frame.epoch) === state.epoch ? Math.max(state.offset, offset) : offset;
      }
      state.epoch = String(frame.epoch);
    } else if (frame.type === "epoch") {
      state.epoch = String(frame.epoch);
      state.offset = Number(frame.offset) || 0;
    } else if (frame.type === "message" && Number.isInteger(frame.offset)) {
      if (frame.offset <= state.offset) return false;
      state.offset = frame.offset;
    }
    return true;
  }

  // Bookkeeping of offsets; false for a broadcast delivered already.
  _accept(conn, frame) {
    if (frame.type === "welcome") {
      conn.welcomed = true;
      this._attempt = 0;
      this.clientId = frame.client_id === undefined ? null : String(frame.client_id);
      this.server = frame.server === undefined ? null : String(frame.server);
      if (frame.epoch === undefined) return true;  // a server without offsets
      const resumed = conn.since !== null;
      if (resumed && frame.recovered === true && frame.epoch === this.epoch) {
        this._emit("recovered", { missed: Number(frame.missed) || 0, since: conn.since,
                                  channel: null });
        return true;  // the replay follows
      }
      if (resumed) {
        this._emit("notrecovered", { since: conn.since, epoch: this.epoch, channel: null });
      }
      const offset = Number(frame.offset) || 0;
      // in the same epoch never go back: a server that lags would repeat broadcasts
      this.offset = String(frame.epoch) === this.epoch ? Math.max(this.offset, offset) : offset;
      this.epoch = String(frame.epoch);
    } else if (frame.type === "epoch") {
      this.epoch = String(frame.epoch);
      this.offset = Number(frame.offset) || 0;
    } else if (frame.type === "message" && Number.isInteger(frame.offset)) {
      if (frame.offset <= this.offset) return false;
      this.offset = frame.offset;
    }
    return true;
  }

  _onClose(sock, conn, ev) {
    if (this._pending === sock) {  // a move that did not work out: try again later
      this._pending = null;
      this._scheduleMove(null);
      return;
    }
    if (this._ws !== sock) return;
    this._ws = null;
    clearTimeout(this._moveTimer);
    this._moveTimer = null;
    if (this._pending) { this._drop(this._pending, 1000, ""); this._pending = null; }
    this._emit("closed", { code: ev.code, reason: ev.reason });
    if (!conn.welcomed && conn.openedAt &&
        Date.now() - conn.openedAt >= this.options.stableResetMs) this._attempt = 0;
    if (this._wanted) {
      this._scheduleRetry(conn.shutdown);
    } else {
      this._setState("disconnected");
    }
  }

  // A draining instance that names others: move (and reconnect) to one of them.
  _followNodes(frame) {
    const nodes = Array.isArray(frame.nodes) ? frame.nodes.filter((n) => typeof n === "string") : [];
    if (frame.reason !== "draining" || nodes.length === 0) return;
    try {
      const base = typeof location === "undefined" ? undefined : location.href;
      const target = new URL(nodes[Math.floor(Math.random() * nodes.length)]);
      const url = new URL(this.url, base);
      url.protocol = target.protocol;
      url.host = target.host;
      this.url = url.toString();
    } catch (e) { /* not a URL: stay */ }
  }

  _hinted(shutdown) {
    const hinted = shutdown ? Number(shutdown.reconnect_after_ms) : NaN;
    return Number.isFinite(hinted) && hinted >= 0 ? hinted : null;
  }

  _scheduleRetry(shutdown) {
    clearTimeout(this._retryTimer);
    let delay = this._hinted(shutdown);
    if (delay === null) {
      delay = fullJitter(this._attempt, this.options);
      this._attempt += 1;
    }
    this._retryTimer = setTimeout(() => {
      this._retryTimer = null;
      if (this._wanted) this._open(false);
    }, delay);
    this._setState("reconnecting", delay);
  }

  // A shutdown frame means "move"; returns the delay, or null if one is under way.
  _scheduleMove(shutdown) {
    if (this._moveTimer || this._pending || !this._wanted) return null;
    let delay = this._hinted(shutdown);
    if (delay === null) {
      delay = fullJitter(this._moveAttempt, this.options);
      this._moveAttempt += 1;
    }
    this._emit("moving", { inMs: delay });
    this._moveTimer = setTimeout(() => {
      this._moveTimer = null;
      if (this._wanted && this._ws) this._open(true);
    }, delay);
    return delay;
  }
}
