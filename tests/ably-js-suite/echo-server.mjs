// A local stand-in for the Ably hosts ably-js's suite calls besides the app under test:
//
//   echo.ably.io                      Ably's public test echo server: JWT minting, authUrl
//                                     responders, `rest.request` method echo
//   internet-up.ably-realtime.com     ably-js's default connectivity check (says `yes`)
//   sandbox.realtime.ably-nonprod.net only `/time`, which one connectivity test uses as a
//                                     plain-URL check
//
// The runner (run.mjs) starts one for a whole run. It listens with TLS on port 443 of a
// loopback address of its own (127.x.y.z, chosen at random so that runs side by side do
// not collide), and offline-dns.cjs, preloaded into each mocha process, resolves exactly
// these names to that address (ABLY_SUITE_ECHO_ADDR): no hosts file is edited, so there is
// nothing to undo. The certificate is signed by a throwaway CA made with `openssl` for the
// run and trusted by the mocha processes only, through NODE_EXTRA_CA_CERTS.
//
// What each path answers (the tests' use of echo.ably.io, read from test/realtime/auth,
// test/rest/auth, test/rest/request and test/realtime/connectivity):
//
//   /createJWT          an Ably JWT (HS256, kid = keyName, signed with keySecret) with
//                       x-ably-capability (capability, default {"*":["*"]}), x-ably-clientId
//                       (clientId) and exp = now + expiresIn (default 3600 s). With
//                       innerToken: an embedded-token JWT instead (x-ably-token in the JOSE
//                       header, a lifetime a minute short of an hour); with encrypted=1 that
//                       JWT is then encrypted as a compact JWE (dir, A256GCM, kid = keyName,
//                       cty JWT, key SHA-256(keySecret)). Sent as text/plain, or as
//                       application/jwt with returnType=jwt.
//   /?type=json|text    answers `body` (a query param; for a POST without one, the form
//                       fields as a JSON object) with that content type and `status`.
//   /qs_to_body         the query params as a JSON object.
//   /respondwith        an empty answer with the given `status`.
//   /methods            {"method": "<request method, lower case>"}, for any method.
//   /is-the-internet-up.txt   `yes`.
//   /time               [now in ms], as Ably's /time.
// Anything else is 404; `/` without a type is 400 (the real server refuses it too: the
// suite's "fails with plain url" checks that).
import { execFileSync } from 'node:child_process';
import { createCipheriv, createHash, createHmac, randomBytes, randomInt } from 'node:crypto';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:https';
import { join } from 'node:path';

/// The names the stand-in answers for (offline-dns.cjs resolves these, and only these).
export const ECHO_HOSTS = ['echo.ably.io', 'internet-up.ably-realtime.com', 'sandbox.realtime.ably-nonprod.net'];
/// The port the tests use: they name the hosts with https:// and no port.
const HTTPS_PORT = 443;
/// Largest request body read (the suite's authUrl POST bodies are a few hundred bytes).
const BODY_BYTES_MAX = 64 * 1024;
/// Random loopback addresses tried before giving up (one in use is skipped).
const BIND_ATTEMPTS = 8;
/// Default lifetime of a minted JWT, as the real echo server's (seconds).
const JWT_TTL_S_DEFAULT = 3600;
/// Default lifetime of an embedded-token JWT: short of an inner token's default hour.
const EMBEDDED_TTL_S_DEFAULT = JWT_TTL_S_DEFAULT - 60;
/// Days the throwaway certificates are valid (a run takes minutes).
const CERT_DAYS = 2;

function run(args, cwd) {
  execFileSync('openssl', args, { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
}

/// Writes ca.pem, server.pem and server.key into `dir`: a throwaway CA and a server
/// certificate it signs for ECHO_HOSTS. Throws, saying so, if openssl is missing.
export function makeCertificates(dir) {
  mkdirSync(dir, { recursive: true });
  try {
    execFileSync('openssl', ['version'], { stdio: 'ignore' });
  } catch {
    throw new Error('openssl not found: the echo.ably.io stand-in needs it for its throwaway CA (apt-get install openssl)');
  }
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  run(
    ['req', '-x509', ...ec, '-keyout', 'ca.key', '-out', 'ca.pem', '-days', String(CERT_DAYS),
      '-subj', '/CN=Tern ably-js suite throwaway CA',
      '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign'],
    dir,
  );
  run(['req', ...ec, '-keyout', 'server.key', '-out', 'server.csr', '-subj', `/CN=${ECHO_HOSTS[0]}`], dir);
  writeFileSync(
    join(dir, 'server.ext'),
    [
      `subjectAltName=${ECHO_HOSTS.map((h) => `DNS:${h}`).join(',')}`,
      'basicConstraints=critical,CA:FALSE',
      'keyUsage=critical,digitalSignature',
      'extendedKeyUsage=serverAuth',
      '',
    ].join('\n'),
  );
  run(
    ['x509', '-req', '-in', 'server.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial',
      '-out', 'server.pem', '-days', String(CERT_DAYS), '-extfile', 'server.ext'],
    dir,
  );
  return { ca: join(dir, 'ca.pem'), cert: join(dir, 'server.pem'), key: join(dir, 'server.key') };
}

const b64url = (data) => Buffer.from(data).toString('base64url');

function signHs256(header, claims, secret) {
  const input = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(claims))}`;
  return `${input}.${createHmac('sha256', secret).update(input).digest('base64url')}`;
}

/// Compact JWE, `dir` + A256GCM, the key SHA-256 of the key secret (see the header).
function encryptJwe(plaintext, keyName, secret) {
  const header = b64url(JSON.stringify({ alg: 'dir', enc: 'A256GCM', kid: keyName, cty: 'JWT' }));
  const iv = randomBytes(12);
  const cipher = createCipheriv('aes-256-gcm', createHash('sha256').update(secret).digest(), iv);
  cipher.setAAD(Buffer.from(header, 'ascii'));
  const ciphertext = Buffer.concat([cipher.update(plaintext, 'utf8'), cipher.final()]);
  return `${header}..${b64url(iv)}.${b64url(ciphertext)}.${b64url(cipher.getAuthTag())}`;
}

/// The token /createJWT answers for `params` (URLSearchParams), at `nowS` (seconds).
export function createJwt(params, nowS) {
  const keyName = params.get('keyName');
  const secret = params.get('keySecret');
  if (!keyName || !secret) return { status: 400, text: 'keyName and keySecret are required' };
  const ttlS = Number(params.get('expiresIn') || JWT_TTL_S_DEFAULT);
  if (!(ttlS > 0)) return { status: 400, text: 'expiresIn must be a positive number of seconds' };
  const innerToken = params.get('innerToken');
  let token;
  if (innerToken) {
    // An embedded token: the outer JWT carries the Ably token in its JOSE header. Ably
    // refuses an outer exp later than the inner token's expiry, which this server cannot
    // read (the token is opaque), so by default the outer one lives a little less than
    // an inner token minted just before with Ably's default ttl (1 h).
    const outerTtlS = params.get('expiresIn') ? ttlS : EMBEDDED_TTL_S_DEFAULT;
    const claims = { iat: nowS, exp: nowS + outerTtlS };
    token = signHs256({ typ: 'JWT', alg: 'HS256', kid: keyName, 'x-ably-token': innerToken }, claims, secret);
    if (params.get('encrypted') === '1' || params.get('encrypted') === 'true') token = encryptJwe(token, keyName, secret);
  } else {
    if (params.get('jwtType') === 'embedded') {
      // The real server asks Ably for the inner token; this one cannot reach the app.
      return { status: 400, text: 'jwtType=embedded needs innerToken here (mint it against the app under test)' };
    }
    const claims = {
      iat: nowS,
      exp: nowS + ttlS,
      'x-ably-capability': params.get('capability') || '{"*":["*"]}',
    };
    const clientId = params.get('clientId');
    if (clientId) claims['x-ably-clientId'] = clientId;
    token = signHs256({ typ: 'JWT', alg: 'HS256', kid: keyName }, claims, secret);
  }
  const type = params.get('returnType') === 'jwt' ? 'application/jwt' : 'text/plain';
  return { status: 200, type, text: token };
}

function fromStatus(value, fallback) {
  const status = Number(value);
  return Number.isInteger(status) && status >= 200 && status <= 599 ? status : fallback;
}

/// `/?type=...`: `body` as given, or the POSTed form as JSON.
function echoBody(params, form) {
  const type = params.get('type');
  if (type !== 'json' && type !== 'text') return { status: 400, text: 'type must be json or text' };
  const status = fromStatus(params.get('status'), 200);
  let text = params.get('body');
  if (text === null) text = type === 'json' ? JSON.stringify(Object.fromEntries(form)) : [...form.keys()].join('');
  return { status, type: type === 'json' ? 'application/json' : 'text/plain', text };
}

/// The answer to one request (method, URL, its body's fields), at `nowMs`.
export function route(method, url, form, nowMs) {
  const params = url.searchParams;
  switch (url.pathname) {
    case '/createJWT':
      return createJwt(params, Math.floor(nowMs / 1000));
    case '/':
      return echoBody(params, form);
    case '/qs_to_body':
      return { status: 200, type: 'application/json', text: JSON.stringify(Object.fromEntries(params)) };
    case '/respondwith':
      return { status: fromStatus(params.get('status'), 200), type: 'text/plain', text: '' };
    case '/methods':
      return { status: 200, type: 'application/json', text: JSON.stringify({ method: method.toLowerCase() }) };
    case '/is-the-internet-up.txt':
      return { status: 200, type: 'text/plain', text: 'yes\n' };
    case '/time':
      return { status: 200, type: 'application/json', text: JSON.stringify([nowMs]) };
    default:
      return { status: 404, type: 'text/plain', text: `no such path ${url.pathname}` };
  }
}

/// The fields of a form-encoded or JSON request body.
function formOf(req, body) {
  const type = String(req.headers['content-type'] || '');
  if (type.startsWith('application/json')) {
    try {
      const value = JSON.parse(body);
      if (value && typeof value === 'object') return new Map(Object.entries(value).map(([k, v]) => [k, String(v)]));
    } catch {
      // Not JSON after all: no fields.
    }
    return new Map();
  }
  return new Map(new URLSearchParams(body));
}

function handle(req, res) {
  const chunks = [];
  let bytes = 0;
  req.on('data', (chunk) => {
    bytes += chunk.length;
    if (bytes > BODY_BYTES_MAX) {
      res.writeHead(413, { 'content-type': 'text/plain', connection: 'close' }).end('body too large');
      req.destroy();
      return;
    }
    chunks.push(chunk);
  });
  req.on('end', () => {
    if (res.writableEnded) return;
    const url = new URL(req.url, `https://${req.headers.host || ECHO_HOSTS[0]}`);
    const answer = route(req.method, url, formOf(req, Buffer.concat(chunks).toString('utf8')), Date.now());
    // With a charset, as the real server (Express) sends it. That matters: ably-js parses
    // an error body only for exactly `application/json`, and with it a 403 whose JSON
    // body carries its own `error` would lose its status (authUrl_403_custom_error).
    const type = `${answer.type || 'text/plain'}; charset=utf-8`;
    res.writeHead(answer.status, { 'content-type': type, 'cache-control': 'no-store' });
    res.end(answer.text);
  });
}

function listen(server, host) {
  return new Promise((resolve, reject) => {
    const onError = (err) => {
      server.off('listening', onListening);
      reject(err);
    };
    const onListening = () => {
      server.off('error', onError);
      resolve();
    };
    server.once('error', onError);
    server.once('listening', onListening);
    server.listen(HTTPS_PORT, host);
  });
}

/// Starts the stand-in: certificates in `dir`, TLS on port 443 of a random 127.x.y.z.
/// Resolves with {address, caFile, close()}; rejects (saying why) if it cannot listen.
export async function startEchoServer({ dir }) {
  const files = makeCertificates(dir);
  const server = createServer({ key: readFileSync(files.key), cert: readFileSync(files.cert) }, handle);
  let lastError;
  for (let i = 0; i < BIND_ATTEMPTS; i++) {
    // Not 127.0.0.x, where the app servers and other local services listen.
    const address = `127.${randomInt(100, 255)}.${randomInt(0, 256)}.${randomInt(1, 255)}`;
    try {
      await listen(server, address);
      return {
        address,
        caFile: files.ca,
        close: () => new Promise((done) => {
          server.closeAllConnections();
          server.close(() => done());
        }),
      };
    } catch (err) {
      lastError = err;
      if (err.code !== 'EADDRINUSE') break;
    }
  }
  throw new Error(
    `the echo.ably.io stand-in cannot listen on port ${HTTPS_PORT} of a loopback address (${lastError?.code || lastError}); ` +
      'binding port 443 needs root or CAP_NET_BIND_SERVICE',
  );
}
