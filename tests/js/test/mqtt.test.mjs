// MQTT across regions: Debian's mosquitto_pub / mosquitto_sub (mosquitto-clients, which
// tests/run.sh installs) and ably-js exchange messages through `tern dev`'s three regions
// (docs/mqtt.md); bad credentials and an over-size publish are refused.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Ably from 'ably';
import { connected, options, ternBin, waitUntil } from '../lib/tern.mjs';

const DEV_KEY = 'dev.root:dev-secret-change-me';
const [USER, PASSWORD] = DEV_KEY.split(':');
let tern;
const clients = [];
const children = [];

/// `tern dev --port 0`: its three regions' HTTP and MQTT ports, in region order.
async function startDev() {
  const dir = mkdtempSync(join(tmpdir(), 'tern-mqtt-'));
  const child = spawn(ternBin, ['dev', '--port', '0'], {
    cwd: dir,
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, TERN_LOG: process.env.TERN_LOG || 'warn' },
  });
  let out = '';
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`tern dev did not start: ${out}`)), 30000);
    child.stdout.on('data', (d) => {
      out += d;
      if ((out.match(/listening on http:/g) || []).length >= 3) { clearTimeout(timer); resolve(); }
    });
    child.on('exit', (code) => { clearTimeout(timer); reject(new Error(`tern exited ${code}`)); });
  });
  child.removeAllListeners('exit');
  const ports = (re) => [...out.matchAll(re)].map((m) => Number(m[1]));
  return {
    child,
    http: ports(/listening on http:\/\/127\.0\.0\.1:(\d+)/g),
    mqtt: ports(/mqtt listening on 127\.0\.0\.1:(\d+)/g),
  };
}

const client = (port) => {
  const c = new Ably.Realtime(options(port, { key: DEV_KEY }));
  clients.push(c);
  return c;
};

/// mosquitto_sub on `port`, QoS 1, printing `topic hex-payload` per message; resolves
/// once its SUBACK arrived.
async function subscribe(port, topic) {
  // Line-buffered: mosquitto_sub's stdio buffers a pipe's output otherwise.
  const child = spawn('stdbuf', ['-oL', 'mosquitto_sub', '-h', '127.0.0.1', '-p', String(port), '-u', USER, '-P', PASSWORD,
    '-i', `sub-${port}`, '-q', '1', '-t', topic, '-F', '%t %x', '-d']);
  children.push(child);
  const sub = { lines: [], debug: '' };
  let pending = '';
  child.stdout.on('data', (d) => {
    pending += d;
    const lines = pending.split('\n');
    pending = lines.pop();
    for (const line of lines) {
      if (line.startsWith('Client ') || line.startsWith('Subscribed ')) sub.debug += `${line}\n`;
      else sub.lines.push(line);
    }
  });
  await waitUntil(() => sub.debug.includes('received SUBACK'), 10000, 'mosquitto_sub SUBACK');
  return sub;
}

function publish(port, topic, args, password = PASSWORD) {
  return spawnSync('mosquitto_pub', ['-h', '127.0.0.1', '-p', String(port), '-u', USER, '-P', password,
    '-q', '1', '-t', topic, ...args], { encoding: 'utf8', timeout: 15000 });
}

before(async () => {
  tern = await startDev();
  assert.equal(tern.mqtt.length, 3, 'tern dev prints an MQTT port per region');
});
after(async () => {
  for (const c of clients) c.close();
  for (const c of children) c.kill('SIGTERM');
  tern.child.kill('SIGTERM');
});

test('ably-js in one region reaches mosquitto_sub in another: string, binary and JSON data', async () => {
  // Proves the Ably-to-MQTT payload mapping across regions: UTF-8 text, the same bytes,
  // JSON text, in publish order.
  const [east, west] = [0, 1];
  const sub = await subscribe(tern.mqtt[west], 'devices:d1/cmd');
  const publisher = await connected(client(tern.http[east]));
  const channel = publisher.channels.get('devices:d1/cmd');
  await channel.publish('t', 'héllo');
  await channel.publish('b', Buffer.from([0, 1, 0xfe]));
  await channel.publish('j', { on: true });
  await waitUntil(() => sub.lines.length >= 3, 15000, 'three messages over MQTT');
  const hex = (s) => Buffer.from(s).toString('hex');
  assert.deepEqual(sub.lines, [
    `devices:d1/cmd ${hex('héllo')}`,
    'devices:d1/cmd 0001fe',
    `devices:d1/cmd ${hex('{"on":true}')}`,
  ]);
});

test('mosquitto_pub (QoS 1) in one region reaches ably-js and mosquitto_sub in the others', async () => {
  // Proves MQTT-to-Ably across regions: the payload arrives as the same bytes, and
  // mosquitto_pub's QoS 1 exchange completes (PUBACK after the store and a replica).
  const [east, west, south] = [0, 1, 2];
  const subscriber = await connected(client(tern.http[east]));
  const got = [];
  await subscriber.channels.get('sensors/kitchen').subscribe((m) => got.push(m.data));
  const sub = await subscribe(tern.mqtt[west], 'sensors/kitchen');
  const sent = publish(tern.mqtt[south], 'sensors/kitchen', ['-m', '21.5']);
  assert.equal(sent.status, 0, sent.stderr);
  await waitUntil(() => got.length === 1 && sub.lines.length === 1, 15000, 'delivery in both regions');
  assert.equal(Buffer.from(got[0]).toString(), '21.5');
  assert.deepEqual(sub.lines, [`sensors/kitchen ${Buffer.from('21.5').toString('hex')}`]);
  const history = await new Ably.Rest(options(tern.http[west], { key: DEV_KEY }))
    .channels.get('sensors/kitchen').history();
  assert.deepEqual(history.items.map((m) => Buffer.from(m.data).toString()), ['21.5']);
});

test('mosquitto_pub with a wrong password or an over-size payload is refused', async () => {
  // Proves the refusals a stock client sees: CONNACK 4 and a closed connection for a
  // payload over max_message_size (nothing stored).
  const wrong = publish(tern.mqtt[0], 'refused', ['-m', 'x'], 'wrong');
  assert.notEqual(wrong.status, 0);
  assert.match(wrong.stderr, /bad user name or password/i);
  const big = publish(tern.mqtt[0], 'refused', ['-m', 'x'.repeat(70000)]);
  assert.notEqual(big.status, 0);
  const rest = new Ably.Rest(options(tern.http[0], { key: DEV_KEY }));
  const history = await rest.channels.get('refused').history();
  assert.equal(history.items.length, 0);
});
