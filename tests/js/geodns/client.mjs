// One ably-js client inside a "continent" network namespace (started by check.mjs with
// `ip netns exec`), speaking JSON lines: events on stdout, commands on stdin. It reaches
// Tern the way a production client does: `endpoint: 'realtime.tern.test'` over TLS on
// 443, the name resolved by the namespace's resolver (BIND's geo views), and the
// regions' own names as fallbackHosts.
//
//   node client.mjs land        resolve, connect, report where it landed, exit
//   node client.mjs subscribe   attach CHANNEL, report every message and every (re)connection
//   node client.mjs publish     on "publish N P": publish P0..P(N-1) one by one, each ACKed
import dns from 'node:dns/promises';
import readline from 'node:readline';
import Ably from 'ably';

const NAME = 'realtime.tern.test';
const CHANNEL = 'geodns';
const [mode] = process.argv.slice(2);
const emit = (event) => process.stdout.write(`${JSON.stringify({ ...event, t: Date.now() % 100000 })}\n`);

const client = new Ably.Realtime({
  key: process.env.GEODNS_KEY,
  endpoint: NAME,
  tls: true,
  fallbackHosts: ['us-east.tern.test', 'eu-west.tern.test', 'ap-south.tern.test'],
  // The namespaces have no internet for ably-js's connectivity check.
  disableConnectivityCheck: true,
  disconnectedRetryTimeout: 500,
  logLevel: 0,
});

// Which node took the connection: CONNECTED's connectionDetails.serverId (Tern sets it
// to the node's server_id, e.g. eu-west-1), and the host ably-js used for it.
const manager = client.connection.connectionManager;
const activate = manager.activateTransport.bind(manager);
manager.activateTransport = (error, transport, connectionId, details) => {
  emit({ event: 'connected', serverId: details?.serverId, host: transport.params.host, connectionId });
  return activate(error, transport, connectionId, details);
};
client.connection.on((change) => emit({ event: 'state', state: change.current, reason: change.reason?.message }));

async function main() {
  const { address } = await dns.lookup(NAME, { family: 4 });
  emit({ event: 'resolved', name: NAME, address });
  // whenState, not once: the connection may be up before the lookup above returns.
  await client.connection.whenState('connected');
  const channel = client.channels.get(CHANNEL);
  if (mode === 'land') {
    client.close();
    setTimeout(() => process.exit(0), 100);
    return;
  }
  if (mode === 'subscribe') {
    await channel.subscribe((message) => emit({ event: 'message', data: message.data }));
    emit({ event: 'ready' });
  }
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    const [command, count, prefix] = line.trim().split(' ');
    if (command === 'publish') {
      for (let i = 0; i < Number(count); i++) {
        await channel.publish('n', `${prefix}${i}`);
        emit({ event: 'acked', i });
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
    } else if (command === 'close') {
      break;
    }
  }
  client.close();
  setTimeout(() => process.exit(0), 100);
}

main().catch((err) => {
  emit({ event: 'error', message: String(err?.message || err) });
  process.exit(1);
});
