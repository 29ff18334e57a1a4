// One region's TCP proxy in its own process: every churn client of the region connects
// through it, and it cuts connections when the conductor asks.
// Usage (forked): proxy-worker.mjs TARGET_PORT SEED
import { startProxy } from '../lib/proxy.mjs';
import { rng, serve } from './rpc.mjs';

const [targetPort, seed] = process.argv.slice(2).map(Number);
const random = rng(seed);
const proxy = await startProxy(targetPort);

/// Cuts made, by kind, by whose connection it was (`churn=` in the request line), how
/// many hit a transport that had just (re)connected, and how many were armed cuts of a
/// new transport at its CONNECTED (`handshake`; counted in rst/silent too).
const stats = { rst: 0, silent: 0, subscriber: 0, publisher: 0, young: 0, handshake: 0, none_eligible: 0 };
/// The last cuts, for a failure report: [time, kind, label].
const recent = [];
const RECENT_MAX = 20000;

function label(pair) {
  const match = /[?&]churn=([A-Za-z0-9_-]+)/.exec(pair.request);
  return match ? match[1] : '?';
}

/// The connection to cut for `target`: `any` (a random one at least `minAgeMs` old),
/// `publisher` (a random publisher's) or `young` (the one that connected last: most
/// likely still resuming, re-attaching or replaying its backlog).
function choose(target, minAgeMs) {
  if (target === 'young') {
    const live = proxy.live(0);
    return live.reduce((best, pair) => (!best || pair.openedAt > best.openedAt ? pair : best), null);
  }
  let live = proxy.live(minAgeMs);
  if (target === 'publisher') live = live.filter((pair) => label(pair).startsWith('p'));
  return live.length ? live[Math.floor(random() * live.length)] : null;
}

serve({
  port: () => proxy.port,
  /// Makes each cut of `cuts` (`{ kind, target }`) on a connection `choose` picks. A
  /// silent cut holds the server's side open for a random time in `holdMs` ([min,
  /// max]): shorter than the client's idle timeout, the server sees the transport close
  /// first and parks the connection; longer, the resume finds it still live and
  /// supersedes it.
  cut({ cuts, minAgeMs, holdMs: [holdMin, holdMax] }) {
    const done = [];
    for (const { kind, target } of cuts) {
      const pair = choose(target, minAgeMs);
      const holdMs = holdMin + Math.floor(random() * (holdMax - holdMin));
      if (!pair || !proxy.cut(pair, kind, { holdMs })) { stats.none_eligible += 1; continue; }
      const who = label(pair);
      stats[kind] += 1;
      stats[who.startsWith('p') ? 'publisher' : 'subscriber'] += 1;
      if (Date.now() - pair.openedAt < minAgeMs) stats.young += 1;
      if (recent.length < RECENT_MAX) recent.push([Date.now(), kind, who]);
      done.push(kind);
    }
    return done;
  },
  /// Arms a cut of each kind of `kinds` for the next new connections: each is cut when
  /// the server's first frame (CONNECTED) comes, which the client then never sees. As
  /// nearly every new connection during the chaos is a resume, this cuts resumes the
  /// server has taken but the client does not know of.
  arm({ kinds, holdMs: [holdMin, holdMax] }) {
    for (const kind of kinds) {
      const holdMs = holdMin + Math.floor(random() * (holdMax - holdMin));
      proxy.armCut(kind, {
        holdMs,
        onCut: (pair) => {
          const who = label(pair);
          stats[kind] += 1;
          stats.handshake += 1;
          stats[who.startsWith('p') ? 'publisher' : 'subscriber'] += 1;
          if (recent.length < RECENT_MAX) recent.push([Date.now(), `${kind}-handshake`, who]);
        },
      });
    }
    return kinds.length;
  },
  disarm: () => proxy.disarm(),
  cpu: () => process.cpuUsage(),
  stats: () => ({ ...stats, held: proxy.size }),
  cuts: ({ who }) => recent.filter(([, , w]) => w === who),
  close: () => { proxy.close(); return true; },
});
