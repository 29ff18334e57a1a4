// The echo.ably.io stand-in's answers (echo-server.mjs), without a socket: what each
// path returns, and that the JWTs it mints are what their parameters ask for.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createDecipheriv, createHash, createHmac } from 'node:crypto';
import { route } from './echo-server.mjs';

const NOW_MS = 1_700_000_000_000;
const NOW_S = NOW_MS / 1000;
const get = (path, form = new Map()) => route('GET', new URL(path, 'https://echo.ably.io'), form, NOW_MS);
const part = (token, i) => JSON.parse(Buffer.from(token.split('.')[i], 'base64url').toString('utf8'));

function verifies(token, secret) {
  const [head, claims, signature] = token.split('.');
  return createHmac('sha256', secret).update(`${head}.${claims}`).digest('base64url') === signature;
}

test('/createJWT mints a plain Ably JWT from its parameters', () => {
  // Proves kid, signature, capability, clientId, exp and the two content types.
  const answer = get('/createJWT?keyName=app.key&keySecret=sec&clientId=ann&expiresIn=35&capability=%7B%22a%22%3A%5B%22publish%22%5D%7D');
  assert.equal(answer.status, 200);
  assert.equal(answer.type, 'text/plain');
  assert.deepEqual(part(answer.text, 0), { typ: 'JWT', alg: 'HS256', kid: 'app.key' });
  assert.deepEqual(part(answer.text, 1), {
    iat: NOW_S,
    exp: NOW_S + 35,
    'x-ably-capability': '{"a":["publish"]}',
    'x-ably-clientId': 'ann',
  });
  assert.ok(verifies(answer.text, 'sec'));
  const jwt = get('/createJWT?keyName=app.key&keySecret=sec&returnType=jwt');
  assert.equal(jwt.type, 'application/jwt');
  assert.equal(part(jwt.text, 1)['x-ably-capability'], '{"*":["*"]}');
  assert.equal(part(jwt.text, 1).exp, NOW_S + 3600);
  assert.equal(get('/createJWT?keyName=app.key').status, 400);
});

test('/createJWT with innerToken embeds it, and with encrypted=1 seals it as a JWE', () => {
  // Proves x-ably-token in the JOSE header, and the JWE a key holder can open.
  const embedded = get('/createJWT?keyName=app.key&keySecret=sec&innerToken=tn1.abc.def').text;
  assert.equal(part(embedded, 0)['x-ably-token'], 'tn1.abc.def');
  assert.ok(part(embedded, 1).exp < NOW_S + 3600, 'expires before an inner token of the default hour');
  const jwe = get('/createJWT?keyName=app.key&keySecret=sec&innerToken=tn1.abc.def&encrypted=1').text;
  const [head, key, iv, ciphertext, tag] = jwe.split('.');
  assert.equal(key, '');
  assert.deepEqual(JSON.parse(Buffer.from(head, 'base64url')), { alg: 'dir', enc: 'A256GCM', kid: 'app.key', cty: 'JWT' });
  const decipher = createDecipheriv('aes-256-gcm', createHash('sha256').update('sec').digest(), Buffer.from(iv, 'base64url'));
  decipher.setAAD(Buffer.from(head));
  decipher.setAuthTag(Buffer.from(tag, 'base64url'));
  const inner = Buffer.concat([decipher.update(Buffer.from(ciphertext, 'base64url')), decipher.final()]).toString();
  assert.equal(part(inner, 0)['x-ably-token'], 'tn1.abc.def');
  assert.equal(get('/createJWT?keyName=app.key&keySecret=sec&jwtType=embedded').status, 400);
});

test('the responders answer as the suite expects', () => {
  // Proves each path the suite calls, and the 400 of a bare `/`.
  assert.deepEqual(get('/?type=json&body=%7B%22a%22%3A1%7D'), { status: 200, type: 'application/json', text: '{"a":1}' });
  assert.deepEqual(get('/?type=text&body=tok&status=403'), { status: 403, type: 'text/plain', text: 'tok' });
  assert.equal(get('/?type=json', new Map([['token', 't'], ['expires', '5']])).text, '{"token":"t","expires":"5"}');
  assert.equal(get('/').status, 400);
  assert.equal(get('/qs_to_body?keyName=k&mac=m').text, '{"keyName":"k","mac":"m"}');
  assert.equal(get('/respondwith?status=500').status, 500);
  assert.equal(route('PATCH', new URL('https://echo.ably.io/methods'), new Map(), NOW_MS).text, '{"method":"patch"}');
  assert.equal(get('/is-the-internet-up.txt').text, 'yes\n');
  assert.equal(get('/time').text, `[${NOW_MS}]`);
  assert.equal(get('/nothing').status, 404);
});
