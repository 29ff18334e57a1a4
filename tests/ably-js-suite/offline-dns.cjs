// Preloaded into each mocha process (--require): how Ably's own hosts resolve, whatever
// this machine's network can reach.
//
// - The hosts of the local stand-in (echo-server.mjs: echo.ably.io, the connectivity
//   check, the sandbox's /time) resolve to its loopback address, ABLY_SUITE_ECHO_ADDR,
//   when the runner started one (it also sets NODE_EXTRA_CA_CERTS to the stand-in's CA).
// - Every other Ably host (the cloud sandbox, the default endpoints and fallbacks) fails
//   to resolve at once (ENOTFOUND), so the tests that need them fail the same way, and
//   fast, on every machine, offline or not.
// Nothing else is resolved differently, and no hosts file is touched.
'use strict';
const dns = require('dns');

const OFFLINE = /(^|\.)(ably\.io|ably\.net|ably-nonprod\.net|ably-realtime\.com|ably\.com)\.?$/i;
// Kept in step with ECHO_HOSTS in echo-server.mjs (the names its certificate carries).
const STAND_IN_HOSTS = new Set(['echo.ably.io', 'internet-up.ably-realtime.com', 'sandbox.realtime.ably-nonprod.net']);
const standInAddress = process.env.ABLY_SUITE_ECHO_ADDR || null;

function notFound(hostname) {
  const err = new Error(`getaddrinfo ENOTFOUND ${hostname} (offline-dns.cjs: Ably hosts are not reachable here)`);
  err.code = 'ENOTFOUND';
  err.errno = -3008;
  err.syscall = 'getaddrinfo';
  err.hostname = hostname;
  return err;
}

/// The stand-in's address for `hostname`, null if the name is resolved as usual, or an
/// ENOTFOUND error for an Ably host nothing stands in for.
function override(hostname) {
  if (typeof hostname !== 'string') return null;
  const name = hostname.toLowerCase().replace(/\.$/, '');
  if (standInAddress && STAND_IN_HOSTS.has(name)) return standInAddress;
  if (OFFLINE.test(name)) return notFound(hostname);
  return null;
}

/// What the stand-in's address looks like as dns.lookup answers it for `options`.
function answer(address, options) {
  const all = typeof options === 'object' && options !== null && options.all;
  const family = typeof options === 'number' ? options : options && options.family;
  if (family === 6 || family === 'IPv6') return notFound(address);
  return all ? [[{ address, family: 4 }]] : [address, 4];
}

const lookup = dns.lookup;
dns.lookup = function offlineLookup(hostname, options, callback) {
  if (typeof options === 'function') {
    callback = options;
    options = undefined;
  }
  const found = override(hostname);
  if (found === null) return lookup.apply(this, arguments);
  if (found instanceof Error) {
    process.nextTick(callback, found);
    return {};
  }
  const result = answer(found, options);
  if (result instanceof Error) process.nextTick(callback, result);
  else process.nextTick(callback, null, ...result);
  return {};
};

const promiseLookup = dns.promises.lookup;
dns.promises.lookup = function offlineLookup(hostname, options) {
  const found = override(hostname);
  if (found === null) return promiseLookup.apply(this, arguments);
  if (found instanceof Error) return Promise.reject(found);
  const result = answer(found, options);
  if (result instanceof Error) return Promise.reject(result);
  return Promise.resolve(Array.isArray(result[0]) ? result[0] : { address: result[0], family: result[1] });
};
