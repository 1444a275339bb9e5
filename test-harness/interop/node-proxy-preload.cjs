// Preload for Node 20, whose global fetch ignores HTTPS_PROXY/HTTP_PROXY/NO_PROXY:
//   NODE_OPTIONS="--require /path/to/node-proxy-preload.cjs"
// installs undici's EnvHttpProxyAgent as the global dispatcher, so every fetch (the
// openai SDK's included) goes through the proxy the environment names, CONNECT for
// https:// URLs. TLS to the origin still uses Node's default CAs plus
// NODE_EXTRA_CA_CERTS. With no proxy variables set it connects directly.
//
// undici comes from the interop cache that scripts/install-deps.sh fills:
// $EGRESS_NODE_INTEROP (default ~/.cache/egress-gateway/node-interop), else NODE_PATH.
// Without it this throws: a proxy silently ignored would be worse than no run.
'use strict';

const os = require('node:os');
const path = require('node:path');
const { createRequire } = require('node:module');

function loadUndici() {
  const dir =
    process.env.EGRESS_NODE_INTEROP ||
    path.join(os.homedir(), '.cache', 'egress-gateway', 'node-interop');
  try {
    return createRequire(path.join(dir, 'package.json'))('undici');
  } catch (fromCache) {
    try {
      return require('undici');
    } catch {
      throw new Error(
        `node-proxy-preload: cannot load undici from ${dir} (${fromCache.message}); ` +
          'run scripts/install-deps.sh',
      );
    }
  }
}

const undici = loadUndici();
undici.setGlobalDispatcher(new undici.EnvHttpProxyAgent());
