// Cost of a resume for a client that missed N messages (issue: message continuity).
// A subscriber attaches and drops its transport; a publisher publishes N messages
// (waiting for each ACK); the subscriber reconnects with resume=<connectionKey>,
// re-attaches with its channelSerial, and we time reconnect → last missed message.
// Usage: node scripts/bench-resume.mjs PORT KEY [missed=1000] [payload_bytes=100] [runs=5]
import WebSocket from '../tests/js/node_modules/ws/index.js';

const [port, key, missed = '1000', payloadBytes = '100', runs = '5'] = process.argv.slice(2);
const url = (extra = '') => `ws://127.0.0.1:${port}/?key=${encodeURIComponent(key)}&format=json&heartbeats=false&v=6${extra}`;
const payload = 'x'.repeat(Number(payloadBytes));

function open(u) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(u);
    // Frames can arrive in the same tick as 'open': keep them until asked for.
    const waiters = [];
    const unclaimed = [];
    ws.on('message', (d) => {
      const f = JSON.parse(d.toString());
      ws.onframe?.(f);
      const w = waiters.find((w) => w.test(f));
      if (w) { waiters.splice(waiters.indexOf(w), 1); w.resolve(f); } else if (unclaimed.length < 10000) unclaimed.push(f);
    });
    ws.next = (test) => {
      const i = unclaimed.findIndex(test);
      if (i >= 0) return Promise.resolve(unclaimed.splice(i, 1)[0]);
      return new Promise((r) => waiters.push({ test, resolve: r }));
    };
    ws.once('open', () => resolve(ws));
    ws.once('error', reject);
  });
}

const times = [];
for (let run = 0; run < Number(runs); run++) {
  const channel = `resume-bench-${run}-${Date.now()}`;
  const sub = await open(url());
  const hello = await sub.next((f) => f.action === 4);
  sub.send(JSON.stringify({ action: 10, channel }));
  const attached = await sub.next((f) => f.action === 11);
  sub.terminate();
  const pub = await open(url());
  await pub.next((f) => f.action === 4);
  for (let i = 0; i < Number(missed); i++) {
    pub.send(JSON.stringify({ action: 15, channel, msgSerial: i, messages: [{ name: 'b', data: payload }] }));
    await pub.next((f) => f.action === 1 && f.msgSerial === i);
  }
  const start = process.hrtime.bigint();
  const again = await open(url(`&resume=${encodeURIComponent(hello.connectionDetails.connectionKey)}`));
  let got = 0; // MESSAGE frames only come after our ATTACH below, so onframe is in place.
  let finish;
  const done = new Promise((resolve) => { finish = resolve; });
  again.onframe = (f) => {
    if (f.action === 15) { got += f.messages.length; if (got === Number(missed)) finish(); }
  };
  const connected = await again.next((f) => f.action === 4);
  if (connected.connectionId !== hello.connectionId) throw new Error('resume failed');
  again.send(JSON.stringify({ action: 10, channel, channelSerial: attached.channelSerial }));
  const reattached = await again.next((f) => f.action === 11);
  if (!(reattached.flags & 4)) throw new Error('not RESUMED');
  await done;
  times.push(Number(process.hrtime.bigint() - start) / 1e6);
  again.close();
  pub.close();
}
times.sort((a, b) => a - b);
console.log(JSON.stringify({ missed: Number(missed), payloadBytes: Number(payloadBytes), runs: times.length, p50_ms: times[Math.floor(times.length / 2)], max_ms: times.at(-1), all_ms: times.map((t) => +t.toFixed(2)) }));
process.exit(0);
