'use strict';
// An ioredis client from the runner's RUNNER_REDIS_URL forms (docs/operations.md):
//   redis:// rediss:// unix://                          one server (ioredis parses these itself)
//   redis+sentinel://[user:pass@]h:p[,h:p...]/<master>[/<db>][?sentinel_username=&sentinel_password=]
//   redis+cluster://[user:pass@]h:p[,h:p...]            seed nodes of a Redis Cluster
// (rediss+... for TLS; ssl_ca_certs=FILE in the query names a private CA.)
// The same file is in scripts/status-sink/src and scripts/bull-board (each is deployed alone);
// tests/unit/test_redis_connect.py keeps the two copies identical.
const { readFileSync } = require('node:fs');

function parseRedisUrl(url) {
  const match = /^([a-z+]+):\/\/(.*)$/i.exec(url || '');
  const scheme = match ? match[1].toLowerCase() : '';
  if (['redis', 'rediss', 'unix'].includes(scheme)) return { kind: 'single', url };
  const topology = /^(rediss?)\+(sentinel|cluster)$/.exec(scheme);
  if (!topology) {
    throw new Error(
      `REDIS_URL: unknown scheme '${scheme || '(none)'}'; use redis://, rediss://, unix://, ` +
        'redis+sentinel://, rediss+sentinel://, redis+cluster:// or rediss+cluster://'
    );
  }
  const rest = match[2];
  const queryAt = rest.indexOf('?');
  const query = new URLSearchParams(queryAt >= 0 ? rest.slice(queryAt + 1) : '');
  const beforeQuery = queryAt >= 0 ? rest.slice(0, queryAt) : rest;
  const at = beforeQuery.lastIndexOf('@', beforeQuery.indexOf('/') >= 0 ? beforeQuery.indexOf('/') : undefined);
  const userinfo = at >= 0 ? beforeQuery.slice(0, at) : '';
  const afterUser = at >= 0 ? beforeQuery.slice(at + 1) : beforeQuery;
  const slash = afterUser.indexOf('/');
  const hostList = slash >= 0 ? afterUser.slice(0, slash) : afterUser;
  const path = (slash >= 0 ? afterUser.slice(slash + 1) : '').split('/').filter(Boolean);
  const [user, ...pass] = userinfo.split(':');
  const kind = topology[2];
  const defaultPort = kind === 'sentinel' ? 26379 : 6379;
  const nodes = hostList.split(',').map((item) => {
    const colon = item.lastIndexOf(':');
    const host = (colon >= 0 ? item.slice(0, colon) : item).replace(/^\[|\]$/g, '');
    const port = colon >= 0 ? Number(item.slice(colon + 1)) : defaultPort;
    if (!host || !Number.isInteger(port)) throw new Error(`REDIS_URL: bad node '${item}'`);
    return { host, port };
  });
  const tls = topology[1] === 'rediss';
  const tlsOptions = tls
    ? {
        ...(query.get('ssl_ca_certs') ? { ca: readFileSync(query.get('ssl_ca_certs')) } : {}),
        ...(query.get('ssl_cert_reqs') === 'none' ? { rejectUnauthorized: false } : {}),
      }
    : undefined;
  const out = {
    kind,
    nodes,
    username: decodeURIComponent(user || '') || undefined,
    password: decodeURIComponent(pass.join(':') || '') || undefined,
    tls: tlsOptions,
  };
  if (kind === 'sentinel') {
    if (path.length < 1 || path.length > 2) {
      throw new Error('REDIS_URL: redis+sentinel:// needs the master name: redis+sentinel://h:26379/<master>[/<db>]');
    }
    out.name = decodeURIComponent(path[0]);
    out.db = path[1] ? Number(path[1]) : 0;
    out.sentinelUsername = query.get('sentinel_username') || undefined;
    out.sentinelPassword = query.get('sentinel_password') || undefined;
  }
  return out;
}

// createRedis(IORedis, url, options): `options` are ioredis options for each connection
// (e.g. {maxRetriesPerRequest: null} for BullMQ).
function createRedis(IORedis, url, options = {}) {
  const target = parseRedisUrl(url);
  if (target.kind === 'single') return new IORedis(url, options);
  const auth = { username: target.username, password: target.password };
  if (target.kind === 'sentinel') {
    return new IORedis({
      ...options,
      ...auth,
      sentinels: target.nodes,
      name: target.name,
      db: target.db,
      sentinelUsername: target.sentinelUsername,
      sentinelPassword: target.sentinelPassword,
      ...(target.tls ? { tls: target.tls, sentinelTLS: target.tls, enableTLSForSentinelMode: true } : {}),
    });
  }
  return new IORedis.Cluster(target.nodes, {
    redisOptions: { ...options, ...auth, ...(target.tls ? { tls: target.tls } : {}) },
    ...(target.tls ? { dnsLookup: (address, callback) => callback(null, address) } : {}),
  });
}

// Redis Cluster keeps a queue's keys in one slot only under a {hash-tag} prefix.
function checkPrefix(url, prefix) {
  if (parseRedisUrl(url).kind === 'cluster' && !/\{[^}]+\}/.test(prefix)) {
    throw new Error(`prefix '${prefix}' has no {hash-tag}: on Redis Cluster use a prefix such as {bull}`);
  }
}

module.exports = { parseRedisUrl, createRedis, checkPrefix };
