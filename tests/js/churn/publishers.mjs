// The churn program's publishers in one process: ably-js clients through their region's
// proxy (so their transports are cut too), each publishing numbered messages (name
// `p<index>`, data = its sequence number as a string; sequence s goes to channel s mod channels) at
// a steady rate and recording which were ACKed (the publish promise resolved).
import Ably from 'ably';
import { options } from '../lib/tern.mjs';
import { serve, sleep } from './rpc.mjs';

const TICK_MS = 50;
let settings = null;
const publishers = [];
let ticker = null;
let startedAt = 0;

function makePublisher({ index, label, port, binary }) {
  const client = new Ably.Realtime(options(port, { ...settings.ably, binary, transportParams: { churn: label } }));
  const pub = {
    index,
    label,
    client,
    channels: Array.from({ length: settings.channels }, (_, c) => client.channels.get(`churn-${c}`)),
    issued: 0,
    inFlight: 0,
    acked: 0,
    /// Sequence numbers that got no ACK: refused (with the error code) or never answered.
    rejected: new Map(),
    pending: new Set(),
    disconnects: 0,
    resumed: 0,
    fresh: 0,
    lastId: null,
  };
  client.connection.on((change) => {
    if (change.current === 'disconnected' && change.previous === 'connected') pub.disconnects += 1;
    if (change.current !== 'connected') return;
    const id = client.connection.id;
    if (pub.lastId !== null) {
      if (id === pub.lastId) pub.resumed += 1;
      else pub.fresh += 1;
    }
    pub.lastId = id;
  });
  return pub;
}

function publishNext(pub) {
  const seq = pub.issued++;
  pub.inFlight += 1;
  pub.pending.add(seq);
  pub.channels[seq % settings.channels].publish(`p${pub.index}`, String(seq)).then(
    () => { pub.acked += 1; },
    (err) => { pub.rejected.set(seq, err?.code ?? 'error'); },
  ).finally(() => {
    pub.inFlight -= 1;
    pub.pending.delete(seq);
  });
}

function tick() {
  const due = Math.floor(((Date.now() - startedAt) / 1000) * settings.ratePerSec);
  for (const pub of publishers) {
    while (pub.issued < due && pub.inFlight < settings.inFlightMax) publishNext(pub);
  }
}

serve({
  async start(payload) {
    settings = payload.settings;
    publishers.push(...payload.publishers.map(makePublisher));
    await Promise.all(publishers.map((pub) => new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${pub.label} did not connect`)), 30000);
      pub.client.connection.once('connected', () => { clearTimeout(timer); resolve(); });
    })));
    return publishers.length;
  },
  run() {
    startedAt = Date.now();
    ticker = setInterval(tick, TICK_MS);
    return true;
  },
  cpu: () => process.cpuUsage(),
  progress() {
    return publishers.reduce((sum, pub) => ({
      issued: sum.issued + pub.issued, acked: sum.acked + pub.acked, inFlight: sum.inFlight + pub.inFlight,
    }), { issued: 0, acked: 0, inFlight: 0 });
  },
  /// Stops publishing and waits (at most `settleMs`) for every publish to be answered.
  async stop({ settleMs }) {
    clearInterval(ticker);
    const deadline = Date.now() + settleMs;
    while (publishers.some((pub) => pub.inFlight > 0) && Date.now() < deadline) await sleep(100);
    return publishers.map((pub) => {
      const codes = {};
      for (const code of pub.rejected.values()) codes[code] = (codes[code] || 0) + 1;
      return {
        index: pub.index,
        label: pub.label,
        published: pub.issued,
        acked: pub.acked,
        unacked: [...pub.rejected.keys(), ...pub.pending],
        rejectedCodes: codes,
        unanswered: pub.pending.size,
        disconnects: pub.disconnects,
        resumed: pub.resumed,
        fresh: pub.fresh,
      };
    });
  },
  async close() {
    for (const pub of publishers) pub.client.close();
    await sleep(200);
    return true;
  },
});
