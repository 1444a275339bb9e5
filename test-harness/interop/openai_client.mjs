// The official `openai` Node SDK, unmodified: default base URL, the global fetch.
// Everything about the network comes from the environment, as for an agent in a pod:
//
//   OPENAI_API_KEY       the agent-side key (a dummy the gateway replaces)
//   HTTPS_PROXY          e.g. http://127.0.0.1:<sidecar port>
//   NODE_EXTRA_CA_CERTS  the CA to trust besides Node's own (the interception CA)
//   NODE_OPTIONS         --require <this dir>/node-proxy-preload.cjs (Node 20's fetch
//                        ignores HTTPS_PROXY without it)
//   OPENAI_BASE_URL      only when a test talks to a fake directly (no gateway)
//   EGRESS_NODE_INTEROP  where `openai` is installed (default
//                        ~/.cache/egress-gateway/node-interop)
//   EGRESS_TEST_MODEL, EGRESS_TEST_DENIED_MODEL (empty: skip that step),
//   EGRESS_TEST_TIMEOUT  seconds per call (default 30)
//
// Prints one JSON line per step (completion, stream, denied); exits 0 when all are ok.
// maxRetries: 0 (a client option, not a transport change) makes errors surface at once.

import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';

const dir =
  process.env.EGRESS_NODE_INTEROP ||
  path.join(os.homedir(), '.cache', 'egress-gateway', 'node-interop');
const require = createRequire(path.join(dir, 'package.json'));
const OpenAI = require('openai');

const env = (name, fallback = '') => (process.env[name] || '').trim() || fallback;
const MODEL = env('EGRESS_TEST_MODEL', 'gpt-4o-mini');
const DENIED = env('EGRESS_TEST_DENIED_MODEL');
const PROMPT = [{ role: 'user', content: 'Say hello.' }];

if (env('HTTPS_PROXY') || env('https_proxy')) {
  if (!globalThis[Symbol.for('undici.globalDispatcher.1')]) {
    process.stderr.write(
      'warning: HTTPS_PROXY is set but no global dispatcher is installed; ' +
        'Node 20 fetch will ignore the proxy (NODE_OPTIONS=--require node-proxy-preload.cjs)\n',
    );
  }
}

// One client for every step, as an agent keeps one.
let cached;
const client = () =>
  (cached ??= new OpenAI({
    maxRetries: 0,
    timeout: Number(env('EGRESS_TEST_TIMEOUT', '30')) * 1000,
  }));

// Like Python's repr(e): the class, the message, and the chain of causes (fetch
// failures keep the reason in `cause`).
function describe(e) {
  let out = `${e?.constructor?.name ?? 'Error'}: ${e?.message ?? String(e)}`;
  for (let c = e?.cause, depth = 0; c && depth < 4; c = c.cause, depth++) {
    out += ` (cause: ${c.code ? `${c.code} ` : ''}${c.message ?? String(c)})`;
  }
  return out;
}

const steps = [
  [
    'completion',
    async () => {
      const r = await client().chat.completions.create({ model: MODEL, messages: PROMPT });
      return { text: r.choices[0].message.content, model: r.model, usage: r.usage ?? null };
    },
  ],
  [
    'stream',
    async () => {
      let text = '';
      let chunks = 0;
      let model = null;
      const stream = await client().chat.completions.create({
        model: MODEL,
        messages: PROMPT,
        stream: true,
      });
      for await (const chunk of stream) {
        model = model ?? chunk.model;
        for (const choice of chunk.choices ?? []) {
          if (choice.delta?.content) {
            text += choice.delta.content;
            chunks += 1;
          }
        }
      }
      return { text, chunks, model };
    },
  ],
  [
    'denied',
    async () => {
      const r = await client().chat.completions.create({ model: DENIED, messages: PROMPT });
      return { model: r.model };
    },
  ],
];

let allOk = true;
for (const [step, run] of steps) {
  let line;
  if (step === 'denied' && !DENIED) {
    line = { step, ok: true, skipped: true };
  } else {
    try {
      const fields = await run();
      line =
        step === 'denied'
          ? { step, ok: false, error: `the denied model ${JSON.stringify(DENIED)} was answered: ${JSON.stringify(fields)}` }
          : { step, ok: true, ...fields };
    } catch (e) {
      if (e instanceof OpenAI.PermissionDeniedError) {
        line = {
          step,
          ok: step === 'denied' && e.status === 403,
          status: e.status,
          message: String(e.message),
          // The response body's `error.type` ("egress_denied" from the gateway).
          body_error: e.error?.type ?? e.error ?? null,
        };
        if (!line.ok) line.error = describe(e);
      } else {
        line = { step, ok: false, error: describe(e) };
        if (typeof e?.status === 'number') line.status = e.status;
      }
    }
  }
  allOk &&= line.ok;
  process.stdout.write(JSON.stringify(line) + '\n');
}
process.exitCode = allOk ? 0 : 1;
