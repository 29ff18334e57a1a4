// A TCP proxy the test controls, to cut a client's transport mid-stream: all at once
// (`dropAll`), one connection at a time with a TCP RST or silently (`cut`), or the next
// new connection just before its CONNECTED reaches the client (`armCut`).
import net from 'node:net';

/// The request line of an HTTP upgrade is kept (at most this many bytes) so a test can
/// tell whose connection it is cutting.
const REQUEST_LINE_MAX = 2048;

export function startProxy(targetPort) {
  /// Every connection pair: forwarding, or blackholed by a silent cut.
  const pairs = new Set();
  /// Cuts to make on the next new connections, each when its first WebSocket frame
  /// comes from the server (see `armCut`).
  const armed = [];
  let target = targetPort;
  let paused = false;
  const server = net.createServer((client) => {
    if (paused) { client.destroy(); return; }
    const upstream = net.connect(target, '127.0.0.1');
    const pair = { client, upstream, openedAt: Date.now(), request: '', bytesDown: 0, silent: false, holdTimer: null };
    pairs.add(pair);
    client.pipe(upstream);
    const arm = armed.shift();
    if (arm) cutAtFirstFrame(pair, arm);
    else upstream.pipe(client);
    const sniff = (chunk) => {
      pair.request += chunk.toString('latin1', 0, Math.min(chunk.length, REQUEST_LINE_MAX - pair.request.length));
      const end = pair.request.indexOf('\r\n');
      if (end >= 0 || pair.request.length >= REQUEST_LINE_MAX) {
        if (end >= 0) pair.request = pair.request.slice(0, end);
        client.off('data', sniff);
      }
    };
    client.on('data', sniff);
    upstream.on('data', (chunk) => { pair.bytesDown += chunk.length; });
    const close = () => {
      client.destroy();
      upstream.destroy();
      clearTimeout(pair.holdTimer);
      pairs.delete(pair);
    };
    for (const s of [client, upstream]) {
      s.on('error', () => { if (!pair.silent) close(); });
      s.on('close', () => { if (!pair.silent) close(); });
    }
  });

  /// Stops forwarding in both directions without closing either side: each side's
  /// bytes are read and thrown away, as a network that loses every packet would. The
  /// client notices only by its idle timeout; the server's side is held open for
  /// `holdMs` (or until the server closes it), so a resume finds the old transport
  /// still live on the server and must supersede it.
  function blackhole(pair, holdMs) {
    pair.silent = true;
    pair.client.unpipe(pair.upstream);
    pair.upstream.unpipe(pair.client);
    for (const s of [pair.client, pair.upstream]) {
      s.on('data', () => {});
      s.resume();
    }
    const forget = () => {
      if (pair.client.destroyed && pair.upstream.destroyed) {
        clearTimeout(pair.holdTimer);
        pairs.delete(pair);
      }
    };
    pair.client.on('close', () => { pair.client.destroy(); forget(); });
    pair.upstream.on('close', () => { pair.upstream.destroy(); forget(); });
    pair.client.on('end', () => pair.client.destroy());
    pair.upstream.on('end', () => pair.upstream.destroy());
    pair.holdTimer = setTimeout(() => {
      pair.client.destroy();
      pair.upstream.destroy();
      pairs.delete(pair);
    }, holdMs);
  }

  /// Forwards the server's HTTP upgrade response, but not the first WebSocket frame
  /// after it (the CONNECTED): the connection is cut instead, so the server has taken
  /// the connect or resume and the client never learns its outcome.
  function cutAtFirstFrame(pair, { kind, holdMs, onCut }) {
    let headersDone = false;
    /// The last bytes of the headers so far: the blank line may span two chunks.
    let tail = Buffer.alloc(0);
    const forward = (chunk) => {
      if (!headersDone) {
        const seen = Buffer.concat([tail, chunk]);
        const end = seen.indexOf('\r\n\r\n');
        if (end < 0) {
          tail = seen.subarray(Math.max(0, seen.length - 3));
          pair.client.write(chunk);
          return;
        }
        headersDone = true;
        const afterHeaders = end + 4 - tail.length;
        pair.client.write(chunk.subarray(0, afterHeaders));
        if (afterHeaders === chunk.length) return;
      }
      // The first frame's bytes: they are lost with the connection.
      pair.upstream.off('data', forward);
      pair.bytesDown += 1;
      if (kind === 'rst') {
        pair.client.resetAndDestroy();
        pair.upstream.resetAndDestroy();
        pairs.delete(pair);
      } else {
        blackhole(pair, holdMs);
      }
      onCut?.(pair);
    };
    pair.upstream.on('data', forward);
  }

  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({
    port: server.address().port,
    /// Cuts every live connection through the proxy.
    dropAll() {
      for (const pair of pairs) {
        pair.client.destroy();
        pair.upstream.destroy();
        clearTimeout(pair.holdTimer);
      }
      pairs.clear();
    },
    /// Connections still forwarding that are at least `minAgeMs` old and have had a
    /// reply from the server: `{ openedAt, request, bytesDown }` plus the sockets.
    live(minAgeMs = 0, now = Date.now()) {
      return [...pairs].filter((p) => !p.silent && p.bytesDown > 0 && now - p.openedAt >= minAgeMs);
    },
    /// How many connections the proxy holds (forwarding or blackholed).
    get size() { return pairs.size; },
    /// Cuts one connection from `live()`: `'rst'` resets both sides at once (a
    /// middlebox RST); `'silent'` blackholes it (see above) for at most `holdMs`.
    cut(pair, kind, { holdMs = 30000 } = {}) {
      if (!pairs.has(pair) || pair.silent) return false;
      if (kind === 'rst') {
        pair.client.resetAndDestroy();
        pair.upstream.resetAndDestroy();
        pairs.delete(pair);
      } else if (kind === 'silent') {
        blackhole(pair, holdMs);
      } else {
        throw new Error(`unknown cut kind ${kind}`);
      }
      return true;
    },
    /// The next new connection is cut (`'rst'` or `'silent'`, as in `cut`) right
    /// after the server's upgrade response, before its first frame reaches the client;
    /// `onCut(pair)` is called when it happens.
    armCut(kind, { holdMs = 30000, onCut } = {}) { armed.push({ kind, holdMs, onCut }); },
    /// Forgets the cuts still armed (no new connection has come for them); returns how many.
    disarm() { return armed.splice(0).length; },
    /// New connections go to `port` from now on (what geo-DNS does when a region dies).
    retarget(port) { target = port; },
    /// While paused, new connections are refused (closed at once).
    pause(value) { paused = value; },
    close() { this.dropAll(); server.close(); },
  })));
}
