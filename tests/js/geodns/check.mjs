// The checks of tests/geodns/run.sh, from the root namespace: it starts client.mjs in
// the continents' namespaces and reads what they report.
//
// 1. A client in each continent resolves realtime.tern.test and lands in its region.
// 2. An eu subscriber (on eu-west), an ap publisher (on ap-south) sending N messages and
//    an eu publisher (on eu-west) sending N_EU, each awaited (ACKed); once the eu
//    publisher is done and the ap one a third through, eu-west is SIGKILLed; the
//    subscriber fails over through fallbackHosts and gets every ACKed message exactly
//    once, each publisher's in order.
// 3. Once the health checker has taken eu-west out, a new eu client resolves the name
//    to the next nearest region (us-east) and lands there.
//
// Env: GEODNS_NS_PREFIX, GEODNS_KEY, GEODNS_CA (the client-port CA), GEODNS_KILL_PID
// (eu-west's tern).
import { spawn } from 'node:child_process';
import readline from 'node:readline';
import assert from 'node:assert/strict';
import { fileURLToPath } from 'node:url';

const N = 150;
const KILL_AFTER = 50;
const N_EU = 40;
const script = fileURLToPath(new URL('./client.mjs', import.meta.url));
const { GEODNS_NS_PREFIX: prefix, GEODNS_KEY, GEODNS_CA, GEODNS_KILL_PID } = process.env;
const children = [];
const agents = [];

/** Starts client.mjs MODE in namespace CONTINENT; `next(pred)` waits for an event. */
function agent(continent, mode) {
  const child = spawn('ip', ['netns', 'exec', `${prefix}-${continent}`, process.execPath, script, mode], {
    env: { ...process.env, GEODNS_KEY, NODE_EXTRA_CA_CERTS: GEODNS_CA },
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  children.push(child);
  const events = [];
  const waiters = [];
  readline.createInterface({ input: child.stdout }).on('line', (line) => {
    const event = JSON.parse(line);
    if (event.event === 'error') console.error(`${continent}/${mode}: ${event.message}`);
    events.push(event);
    for (const w of [...waiters]) if (w.pred(event)) { waiters.splice(waiters.indexOf(w), 1); w.resolve(event); }
  });
  const next = (pred, what, timeoutMs = 15000) => {
    const found = events.find(pred);
    if (found) return Promise.resolve(found);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${continent}/${mode}: timed out waiting for ${what}`)), timeoutMs);
      waiters.push({ pred, resolve: (e) => { clearTimeout(timer); resolve(e); } });
    });
  };
  agents.push({ name: `${continent}/${mode}`, events });
  const exited = new Promise((resolve) => child.on('exit', resolve));
  return { child, events, next, exited, send: (line) => child.stdin.write(`${line}\n`) };
}

const is = (name) => (e) => e.event === name;
const where = (events) => events.filter(is('connected')).map((e) => e.serverId);

async function land(continent) {
  const a = agent(continent, 'land');
  const resolved = await a.next(is('resolved'), 'the name resolved');
  const connected = await a.next(is('connected'), 'CONNECTED');
  await a.exited;
  console.log(`${continent}: ${resolved.name} -> ${resolved.address}, connected to ${connected.serverId} (host ${connected.host})`);
  return { address: resolved.address, serverId: connected.serverId };
}

async function main() {
  // 1. Each continent lands in its own region.
  for (const [continent, node, address] of [['us', 'us-east-1', '10.77.11.1'], ['eu', 'eu-west-1', '10.77.12.1'], ['ap', 'ap-south-1', '10.77.13.1']]) {
    assert.deepEqual(await land(continent), { address, serverId: node }, `${continent} lands in its region`);
  }

  // 2. Failover with every ACKed message delivered exactly once: from ap (on ap-south,
  // across the kill) and from eu (on eu-west, all ACKed before eu-west dies: ACKed means
  // another region stored them, so they outlive their origin).
  const subscriber = agent('eu', 'subscribe');
  const publisher = agent('ap', 'publish');
  const doomed = agent('eu', 'publish');
  await subscriber.next(is('ready'), 'the subscriber attached');
  await publisher.next(is('connected'), 'the ap publisher connected');
  await doomed.next(is('connected'), 'the eu publisher connected');
  assert.deepEqual(where(subscriber.events), ['eu-west-1'], 'the eu subscriber is on eu-west');
  assert.deepEqual(where(publisher.events), ['ap-south-1'], 'the ap publisher is on ap-south');
  assert.deepEqual(where(doomed.events), ['eu-west-1'], 'the eu publisher is on eu-west');
  publisher.send(`publish ${N} a`);
  doomed.send(`publish ${N_EU} e`);
  await publisher.next((e) => e.event === 'acked' && e.i === KILL_AFTER - 1, `${KILL_AFTER} ACKs from ap`);
  await doomed.next((e) => e.event === 'acked' && e.i === N_EU - 1, `${N_EU} ACKs from eu`);
  const killedAt = Date.now();
  process.kill(Number(GEODNS_KILL_PID), 'SIGKILL');
  const apAcked = publisher.events.filter(is('acked')).length;
  console.log(`SIGKILL eu-west (pid ${GEODNS_KILL_PID}) after ${apAcked} ACKs from ap, ${N_EU} from eu`);
  await publisher.next((e) => e.event === 'acked' && e.i === N - 1, `all ${N} ACKs`, 60000);
  const sent = [...Array.from({ length: N }, (_, i) => `a${i}`), ...Array.from({ length: N_EU }, (_, i) => `e${i}`)];
  const received = () => subscriber.events.filter(is('message')).map((e) => e.data);
  await subscriber.next(() => received().length >= sent.length, `${sent.length} messages`, 30000).catch(() => {});
  await new Promise((resolve) => setTimeout(resolve, 1000)); // a duplicate would arrive now
  const failoverAt = subscriber.events.filter(is('connected'))[1];
  assert.ok(failoverAt, 'the subscriber reconnected after the kill');
  const after = where(subscriber.events).slice(1);
  assert.ok(after.every((s) => s !== 'eu-west-1') && after.length >= 1, `failed over off eu-west: ${after}`);
  const got = received();
  const missing = sent.filter((m) => !got.includes(m));
  const duplicated = got.filter((m, i) => got.indexOf(m) !== i);
  console.log(`subscriber: ${got.length} received of ${sent.length} ACKed, ${missing.length} missing, ${duplicated.length} duplicated; ` +
    `reconnected to ${after.join(', ')} via ${subscriber.events.filter(is('connected')).slice(1).map((e) => e.host).join(', ')} ` +
    `${(failoverAt.t - (killedAt % 100000) + 100000) % 100000} ms after the kill`);
  assert.deepEqual(missing, [], 'no ACKed message lost');
  assert.deepEqual(duplicated, [], 'no message delivered twice');
  for (const prefix of ['a', 'e']) {
    assert.deepEqual(got.filter((m) => m[0] === prefix), sent.filter((m) => m[0] === prefix), `${prefix}: in publish order`);
  }
  for (const a of [subscriber, publisher, doomed]) a.send('close');
  await Promise.all([subscriber.exited, publisher.exited, doomed.exited]);

  // 3. The health checks took eu-west out of DNS: a new eu client goes to us-east.
  let landed;
  const deadline = Date.now() + 20000;
  do {
    landed = await land('eu');
    if (landed.address === '10.77.11.1') break;
    await new Promise((resolve) => setTimeout(resolve, 1000));
  } while (Date.now() < deadline);
  assert.deepEqual(landed, { address: '10.77.11.1', serverId: 'us-east-1' }, 'a new eu client lands on us-east');
  console.log('geodns: ok');
}

main().then(() => process.exit(0), (err) => {
  console.error(`geodns: FAILED: ${err.message}`);
  for (const { name, events } of agents) {
    const shown = events.filter((e) => !['message', 'acked'].includes(e.event) || e.i % 25 === 0 || ['m0', 'm49', 'm50', 'm149'].includes(e.data));
    console.error(`${name}: ${events.filter(is('message')).length} messages, ${events.filter(is('acked')).length} acks; ${JSON.stringify(shown)}`);
  }
  for (const child of children) child.kill('SIGKILL');
  process.exit(1);
});
