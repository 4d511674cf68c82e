'use strict';
/**
 * Every setting of the sink, its default and its meaning, in one place (README.md lists them).
 */
const os = require('node:os');

const DEFAULTS = {
  REDIS_URL: 'redis://127.0.0.1:6379/0',
  DATABASE_URL: 'postgres://postgres@127.0.0.1:5432/postgres',
  STATUS_STREAM: 'bull:workflow-runs:status',
  STATUS_GROUP: 'status-sink',
  BATCH_SIZE: 500,
  CLAIM_IDLE_MS: 30000,
  BLOCK_MS: 2000,
  SHUTDOWN_GRACE_MS: 15000,
};

function intSetting(env, name, min) {
  const raw = env[name];
  if (raw === undefined || raw === '') return DEFAULTS[name];
  const value = Number(raw);
  if (!Number.isSafeInteger(value) || value < min) {
    throw new Error(`${name} must be an integer >= ${min}, got ${JSON.stringify(raw)}`);
  }
  return value;
}

function strSetting(env, name, fallback) {
  const raw = env[name];
  return raw === undefined || raw === '' ? fallback : raw;
}

function loadConfig(env = process.env) {
  return {
    redisUrl: strSetting(env, 'REDIS_URL', DEFAULTS.REDIS_URL),
    databaseUrl: strSetting(env, 'DATABASE_URL', DEFAULTS.DATABASE_URL),
    stream: strSetting(env, 'STATUS_STREAM', DEFAULTS.STATUS_STREAM),
    group: strSetting(env, 'STATUS_GROUP', DEFAULTS.STATUS_GROUP),
    consumer: strSetting(env, 'CONSUMER_NAME', `${os.hostname()}-${process.pid}`),
    batchSize: intSetting(env, 'BATCH_SIZE', 1),
    claimIdleMs: intSetting(env, 'CLAIM_IDLE_MS', 1),
    blockMs: intSetting(env, 'BLOCK_MS', 1),
    shutdownGraceMs: intSetting(env, 'SHUTDOWN_GRACE_MS', 0),
  };
}

/** A URL fit for a log line: the password replaced. */
function redactUrl(url) {
  try {
    const parsed = new URL(url);
    if (parsed.password) parsed.password = '***';
    return parsed.toString();
  } catch {
    return '<unparsable url>';
  }
}

module.exports = { loadConfig, redactUrl, DEFAULTS };
