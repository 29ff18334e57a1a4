// Inter-node wire v2 (issue 17): events cross regions in a compact, batched, compressed
// form and are rebuilt byte for byte, so a subscriber in a remote region gets the frame
// bytes a subscriber in the origin region gets (JSON and msgpack clients), all but the
// channelSerial, which is each node's own cursor (it was so with wire v1 as well: the
// remote node lists the other origins it knows on the channel, at 0);
// and a node of the previous release (wire v1 only: TERN_CLUSTER_WIRE=1) keeps
// replicating with new ones both ways during a rolling upgrade.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import Ably from 'ably';
import WebSocket from 'ws';
import msgpack from '@ably/msgpack-js';
import { connected, options, startTern, waitUntil } from '../lib/tern.mjs';
import { startRegions, DEV_KEY } from '../lib/regions.mjs';

const MESSAGE = 15;
const ATTACHED = 11;

/// A raw WebSocket subscriber on `channel`: every MESSAGE frame as the bytes received.
async function rawSubscriber(port, channel, format) {
  const ws = new WebSocket(`ws://127.0.0.1:${port}/?key=${encodeURIComponent(DEV_KEY)}&format=${format}&heartbeats=false&v=6`);
  await new Promise((resolve, reject) => { ws.once('open', resolve); ws.once('error', reject); });
  const frames = [];
  let attached;
  const ready = new Promise((r) => { attached = r; });
  ws.on('message', (data) => {
    const bytes = Buffer.from(data);
    const frame = format === 'msgpack' ? msgpack.decode(bytes) : JSON.parse(bytes.toString());
    if (frame.action === ATTACHED) attached();
    if (frame.action === MESSAGE) frames.push(bytes.toString('hex'));
  });
  const attach = { action: 10, channel };
  ws.send(format === 'msgpack' ? msgpack.encode(attach) : JSON.stringify(attach));
  await ready;
  return { ws, frames };
}

/// A delivered frame (hex) as its bytes without the channelSerial field, and that field:
/// every byte of the frame but the node's cursor is compared.
function splitSerial(hex, format) {
  const bytes = Buffer.from(hex, 'hex');
  if (format === 'json') {
    const text = bytes.toString();
    const m = /"channelSerial":"([^"]*)",?/.exec(text);
    return [text.replace(m[0], ''), m[1]];
  }
  const key = Buffer.concat([Buffer.from([0xa0 | 13]), Buffer.from('channelSerial')]);
  const at = bytes.indexOf(key);
  let start = at + key.length;
  let len = bytes[start] & 0x1f;
  let header = 1;
  if (bytes[start] === 0xd9) { len = bytes[start + 1]; header = 2; }
  const serial = bytes.subarray(start + header, start + header + len).toString();
  return [Buffer.concat([bytes.subarray(0, at), bytes.subarray(start + header + len)]).toString('hex'), serial];
}

/// Realistic chat and dashboard payloads: text, JSON objects, binary, a 2 KB document.
function payloads() {
  const words = ['station', 'meeting', 'lunch', 'deploy', 'build', 'ok', 'see you', 'ticket', 'north', 'eu'];
  const out = [];
  for (let i = 0; i < 12; i++) out.push(['text', `${words[i % 10]} at ${i}:${(i * 7) % 60} — ${words[(i * 3) % 10]}`]);
  for (let i = 0; i < 12; i++) out.push(['json', { user: `u${i % 3}`, text: words[i % 10], at: 1780000000000 + i * 13, n: i }]);
  for (let i = 0; i < 4; i++) out.push(['bin', Buffer.from(Array.from({ length: 40 + i }, (_, k) => (k * 31 + i) & 255))]);
  out.push(['json', { series: Array.from({ length: 150 }, (_, k) => ({ t: k, v: Math.round(Math.sin(k) * 1000) / 10 })) }]);
  return out;
}

test('a subscriber in a remote region gets the frame bytes of the origin region (json and msgpack)', async () => {
  const tern = await startTern('', { args: ['dev', '--port', '0'], listening: 3 });
  const clients = [];
  try {
    const [east, west, south] = tern.ports;
    for (const format of ['json', 'msgpack']) {
      const channel = `wire-v2-${format}`;
      const subs = [];
      for (const port of [east, west, south]) subs.push(await rawSubscriber(port, channel, format));
      // An ably-js subscriber in a remote region decodes what was sent.
      const sdk = new Ably.Realtime(options(west, { key: DEV_KEY, binary: format === 'msgpack' }));
      clients.push(sdk);
      await connected(sdk);
      const decoded = [];
      await sdk.channels.get(channel).subscribe((m) => decoded.push(m.data));
      const publisher = new Ably.Realtime(options(east, { key: DEV_KEY, binary: format === 'msgpack', clientId: 'pub' }));
      clients.push(publisher);
      await connected(publisher);
      const sent = payloads();
      for (const [, data] of sent) await publisher.channels.get(channel).publish('m', data);
      await waitUntil(() => subs.every((s) => s.frames.length >= sent.length) && decoded.length >= sent.length, 15000, `${format} delivery`);
      await new Promise((r) => setTimeout(r, 200));
      assert.equal(subs[0].frames.length, sent.length, `${format}: once each at the origin`);
      for (const remote of [subs[1], subs[2]]) {
        assert.equal(remote.frames.length, subs[0].frames.length);
        for (const [i, origin] of subs[0].frames.entries()) {
          const [here, hereSerial] = splitSerial(origin, format);
          const [there, thereSerial] = splitSerial(remote.frames[i], format);
          assert.equal(there, here, `${format} frame ${i}: the bytes around channelSerial`);
          // The channelSerial is the delivering node's cursor (as before wire v2): the
          // origin's entries, plus other origins this node knows on the channel at 0.
          const entries = (serial) => serial.split('.').slice(1);
          for (const entry of entries(hereSerial)) assert.ok(entries(thereSerial).includes(entry), `${thereSerial} has ${entry}`);
          for (const entry of entries(thereSerial).filter((e) => !entries(hereSerial).includes(e))) assert.match(entry, /-0$/);
        }
      }
      assert.equal(decoded.length, sent.length);
      for (const [i, [kind, data]] of sent.entries()) {
        if (kind === 'bin') assert.deepEqual(Buffer.from(decoded[i]), data, `binary ${i}`);
        else assert.deepEqual(decoded[i], data, `${kind} ${i}`);
      }
      for (const s of subs) s.ws.close();
    }
  } finally {
    for (const c of clients) c.close();
    await tern.stop();
  }
});

test('a node of the previous wire (v1 only) and new nodes replicate both ways, once each, in order', async () => {
  const cluster = await startRegions();
  const clients = [];
  const client = (host, extra = {}) => {
    const c = new Ably.Realtime(options(cluster.port, { key: DEV_KEY, endpoint: host, ...extra }));
    clients.push(c);
    return c;
  };
  try {
    // eu-west-2 (127.1.0.2) runs as the release before wire v2 did on the wire.
    process.env.TERN_CLUSTER_WIRE = '1';
    try {
      await cluster.addNode(1, 1);
    } finally {
      delete process.env.TERN_CLUSTER_WIRE;
    }
    const nodes = async (host) => {
      const body = await (await fetch(`http://${host}:${cluster.adminPort}/regions`)).json();
      return body.regions.reduce((sum, r) => sum + r.nodes.length, 0);
    };
    for (const host of ['127.0.0.1', '127.0.0.2', '127.0.0.3', '127.1.0.2']) {
      await waitUntil(async () => (await nodes(host)) === 4, 20000, `membership on ${host}`);
    }
    const hosts = ['127.0.0.1', '127.1.0.2', '127.0.0.3'];
    const got = {};
    for (const host of hosts) {
      const sub = await connected(client(host, { binary: host === '127.1.0.2' }));
      got[host] = [];
      await sub.channels.get('upgrade').subscribe((m) => got[host].push(m.data));
    }
    const east = await connected(client('127.0.0.1'));
    const old = await connected(client('127.1.0.2'));
    const sent = [];
    for (let i = 0; i < 25; i++) {
      for (const [name, publisher] of [['new', east], ['old', old]]) {
        sent.push(`${name}/${i}`);
        await publisher.channels.get('upgrade').publish('n', `${name}/${i}`);
      }
    }
    await waitUntil(() => hosts.every((h) => got[h].length >= sent.length), 20000, 'delivery everywhere');
    await new Promise((r) => setTimeout(r, 300));
    for (const host of hosts) {
      assert.equal(got[host].length, sent.length, `once each on ${host}`);
      for (const origin of ['new', 'old']) {
        const of = (list) => list.filter((d) => d.startsWith(`${origin}/`));
        assert.deepEqual(of(got[host]), of(sent), `${origin}'s messages in order on ${host}`);
      }
    }
    // The old node refused nothing (a v2 record would have been refused and counted).
    const metrics = await (await fetch(`http://127.1.0.2:${cluster.adminPort}/metrics`)).text();
    assert.match(metrics, /^tern_/m, 'metrics read');
    assert.doesNotMatch(metrics, /^tern_cluster_frames_refused_total\{[^}]*\} [1-9]/m);
  } finally {
    for (const c of clients) c.close();
    await cluster.stop();
  }
});
