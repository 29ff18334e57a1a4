// Request/reply over a forked child's IPC channel, and a seeded random source, for the
// churn program's processes.
import { fork } from 'node:child_process';

/// mulberry32: a small seeded PRNG, so a run's choices can be replayed from its seed.
export function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/// Forks `module` and returns `{ child, call(type, payload, ms) }`; `call` resolves with
/// the child's answer or rejects after `ms`. `onEvent` gets messages the child sends
/// unasked (`{ event, ... }`).
export function spawnWorker(module, args = [], onEvent = () => {}) {
  const child = fork(module, args, { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  const waiting = new Map();
  let next = 0;
  child.on('message', (msg) => {
    if (msg.event) { onEvent(msg); return; }
    const entry = waiting.get(msg.id);
    if (!entry) return;
    waiting.delete(msg.id);
    clearTimeout(entry.timer);
    if (msg.error) entry.reject(new Error(msg.error));
    else entry.resolve(msg.result);
  });
  child.on('exit', (code, signal) => {
    for (const entry of waiting.values()) {
      clearTimeout(entry.timer);
      entry.reject(new Error(`${module} exited (${code ?? signal})`));
    }
    waiting.clear();
  });
  return {
    child,
    call(type, payload = {}, ms = 30000) {
      return new Promise((resolve, reject) => {
        const id = next++;
        const timer = setTimeout(() => {
          waiting.delete(id);
          reject(new Error(`${module}: ${type} timed out after ${ms} ms`));
        }, ms);
        waiting.set(id, { resolve, reject, timer });
        child.send({ id, type, payload });
      });
    },
    /// SIGTERM to this child only, SIGKILL after 3 s.
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 3000);
      await exited;
      clearTimeout(timer);
    },
  };
}

/// In a forked child: answers the parent's calls with `handlers[type](payload)`. The
/// child exits when its parent goes away.
export function serve(handlers) {
  process.on('message', async ({ id, type, payload }) => {
    try {
      const handler = handlers[type];
      if (!handler) throw new Error(`no handler for ${type}`);
      const result = await handler(payload);
      process.send({ id, result });
    } catch (err) {
      process.send({ id, error: String(err?.stack || err) });
    }
  });
  process.on('disconnect', () => process.exit(2));
}

/// Sends an unasked event to the parent.
export function emit(event, fields = {}) {
  if (process.connected) process.send({ event, ...fields });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
