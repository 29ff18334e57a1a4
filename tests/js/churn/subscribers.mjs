// A share of the churn program's subscribers in one process: ably-js clients, each
// through its region's proxy, each attached to one channel. It records every delivery
// (per publisher: which sequence numbers, duplicates, order) and every connection and
// channel state change, and at the end checks every subscriber against the publishers'
// ACKed messages.
import Ably from 'ably';
import { options } from '../lib/tern.mjs';
import { serve, sleep } from './rpc.mjs';

/// A growable bitset of sequence numbers.
class Seen {
  constructor() { this.bits = new Uint8Array(64); }
  has(n) { return n >> 3 < this.bits.length && (this.bits[n >> 3] & (1 << (n & 7))) !== 0; }
  add(n) {
    if (n >> 3 >= this.bits.length) {
      const grown = new Uint8Array(Math.max(this.bits.length * 2, (n >> 3) + 1));
      grown.set(this.bits);
      this.bits = grown;
    }
    this.bits[n >> 3] |= 1 << (n & 7);
  }
}

const subscribers = [];
let settings = null;
/// The first problems seen of each kind, with who and what, for the report.
const examples = [];
const examplesByKind = new Map();
const EXAMPLES_PER_KIND = 5;
function example(fields) {
  const seen = examplesByKind.get(fields.kind) || 0;
  if (seen >= EXAMPLES_PER_KIND) return;
  examplesByKind.set(fields.kind, seen + 1);
  examples.push({ at: Date.now(), ...fields });
}

function makeSubscriber({ label, port, channel: channelName, binary }) {
  const client = new Ably.Realtime(options(port, {
    ...settings.ably,
    binary,
    transportParams: { churn: label },
  }));
  const sub = {
    label,
    client,
    channel: client.channels.get(channelName),
    channelIndex: Number(channelName.split('-').pop()),
    firstId: null,
    lastId: null,
    downSince: null,
    attachedOnce: false,
    deliveries: 0,
    duplicates: 0,
    outOfOrder: 0,
    unexpected: 0,
    disconnects: 0,
    resumed: 0,
    fresh: [],
    suspended: 0,
    failed: 0,
    discontinuities: [],
    channelSuspended: 0,
    perPublisher: Array.from({ length: settings.publishers }, () => ({ seen: new Seen(), last: -1 })),
  };
  client.connection.on((change) => {
    const now = Date.now();
    if (change.current === 'disconnected' && change.previous === 'connected') {
      sub.disconnects += 1;
      sub.downSince = now;
    } else if (change.current === 'suspended') {
      sub.suspended += 1;
    } else if (change.current === 'failed') {
      sub.failed += 1;
      example({ label, kind: 'connection failed', reason: change.reason?.message });
    } else if (change.current === 'connected') {
      const id = client.connection.id;
      if (sub.firstId === null) sub.firstId = id;
      else if (id === sub.lastId) sub.resumed += 1;
      else {
        const downMs = sub.downSince === null ? 0 : now - sub.downSince;
        const fresh = { at: now, downMs, code: change.reason?.code, message: change.reason?.message, afterTtl: downMs > settings.connectionStateTtlMs };
        sub.fresh.push(fresh);
        example({ label, kind: 'fresh connection', ...fresh });
      }
      sub.lastId = id;
      sub.downSince = null;
    }
  });
  sub.channel.on((change) => {
    if (change.current === 'suspended') sub.channelSuspended += 1;
    // Both a state change to attached and an `update` (attached → attached) carry
    // `resumed`: false means the server could not continue from the channelSerial.
    if (change.current !== 'attached') return;
    if (sub.attachedOnce && !change.resumed) {
      const lost = { at: Date.now(), code: change.reason?.code, message: change.reason?.message };
      sub.discontinuities.push(lost);
      example({ label, kind: 'channel continuity lost', ...lost });
    }
    sub.attachedOnce = true;
  });
  return sub;
}

function onMessage(sub, message) {
  sub.deliveries += 1;
  const publisher = Number(String(message.name).slice(1));
  const seq = typeof message.data === 'string' && /^\d{1,9}$/.test(message.data) ? Number(message.data) : NaN;
  const per = sub.perPublisher[publisher];
  if (!per || !Number.isInteger(seq) || seq < 0 || seq % settings.channels !== sub.channelIndex) {
    sub.unexpected += 1;
    example({ label: sub.label, kind: 'unexpected message', name: message.name, data: message.data });
    return;
  }
  if (per.seen.has(seq)) {
    sub.duplicates += 1;
    example({ label: sub.label, kind: 'duplicate', publisher, seq, id: message.id });
    return;
  }
  if (seq < per.last) {
    sub.outOfOrder += 1;
    example({ label: sub.label, kind: 'out of order', publisher, seq, after: per.last });
  }
  per.seen.add(seq);
  per.last = Math.max(per.last, seq);
}

async function connectOne(sub) {
  const deadline = Date.now() + settings.attachTimeoutMs;
  for (;;) {
    try {
      await sub.channel.subscribe((m) => onMessage(sub, m));
      return;
    } catch (err) {
      if (Date.now() > deadline) throw new Error(`${sub.label}: attach failed: ${err.message}`);
      await sleep(500);
    }
  }
}

/// Which ACKed messages each subscriber still lacks.
function missing(sub, expected) {
  let count = 0;
  const firstFew = [];
  for (const [publisher, { published, unacked }] of expected.entries()) {
    const skip = new Set(unacked);
    const per = sub.perPublisher[publisher];
    for (let seq = sub.channelIndex; seq < published; seq += settings.channels) {
      if (skip.has(seq) || per.seen.has(seq)) continue;
      count += 1;
      if (firstFew.length < 5) firstFew.push([publisher, seq]);
    }
  }
  return { count, firstFew };
}

function settled(sub) {
  return sub.client.connection.state === 'connected' && sub.channel.state === 'attached';
}

serve({
  /// Connects and attaches every subscriber given (a few at a time).
  async start(payload) {
    settings = payload.settings;
    const todo = payload.subscribers.map(makeSubscriber);
    subscribers.push(...todo);
    const started = Date.now();
    const queue = [...todo];
    const lanes = Array.from({ length: settings.rampConcurrency }, async () => {
      while (queue.length) await connectOne(queue.shift());
    });
    await Promise.all(lanes);
    return { ms: Date.now() - started, count: todo.length };
  },
  cpu: () => process.cpuUsage(),
  progress() {
    let deliveries = 0;
    let connected = 0;
    for (const sub of subscribers) {
      deliveries += sub.deliveries;
      if (settled(sub)) connected += 1;
    }
    return { deliveries, connected, total: subscribers.length };
  },
  /// Waits (at most `settleMs`) until every subscriber is connected, attached and has
  /// every ACKed message, then `quietMs` more for late duplicates; returns the tally.
  async verify({ expected, settleMs, quietMs }) {
    const deadline = Date.now() + settleMs;
    let behind = subscribers;
    while (Date.now() < deadline) {
      behind = behind.filter((sub) => !settled(sub) || missing(sub, expected).count > 0);
      if (behind.length === 0) break;
      await sleep(250);
    }
    await sleep(quietMs);
    const tally = {
      subscribers: subscribers.length, deliveries: 0, lost: 0, duplicated: 0, outOfOrder: 0, unexpected: 0,
      unsettled: 0, disconnects: 0, resumed: 0, fresh: 0, freshAfterTtl: 0, suspended: 0, failed: 0,
      discontinuities: 0, channelSuspended: 0, sameConnection: 0, lostExamples: [],
    };
    for (const sub of subscribers) {
      const gap = missing(sub, expected);
      tally.deliveries += sub.deliveries;
      tally.lost += gap.count;
      if (gap.count > 0 && tally.lostExamples.length < 10) {
        tally.lostExamples.push({
          label: sub.label, missing: gap.count, first: gap.firstFew, connection: sub.client.connection.state,
          channel: sub.channel.state, id: sub.client.connection.id,
        });
      }
      tally.duplicated += sub.duplicates;
      tally.outOfOrder += sub.outOfOrder;
      tally.unexpected += sub.unexpected;
      if (!settled(sub)) tally.unsettled += 1;
      tally.disconnects += sub.disconnects;
      tally.resumed += sub.resumed;
      tally.fresh += sub.fresh.filter((f) => !f.afterTtl).length;
      tally.freshAfterTtl += sub.fresh.filter((f) => f.afterTtl).length;
      tally.suspended += sub.suspended;
      tally.failed += sub.failed;
      tally.discontinuities += sub.discontinuities.length;
      tally.channelSuspended += sub.channelSuspended;
      if (sub.client.connection.id === sub.firstId) tally.sameConnection += 1;
    }
    tally.examples = examples;
    return tally;
  },
  async close() {
    for (const sub of subscribers) sub.client.close();
    await sleep(200);
    return true;
  },
});
