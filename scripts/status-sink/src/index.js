'use strict';
/**
 * Composition root of the status sink: reads the settings, builds the Redis and PostgreSQL
 * clients, runs the loop, and turns SIGTERM/SIGINT into "finish the batch in hand, then exit".
 *
 * Exit codes: 0 stopped cleanly; 1 stopped with entries left pending (they are claimed again,
 * nothing is lost) or a fatal error; 2 bad settings.
 */
const Redis = require('ioredis');
const pg = require('pg');
const { loadConfig, redactUrl } = require('./config');
const { log, describeError } = require('./log');
const { StatusSink } = require('./sink');
const { createRedis } = require('./redis-url');

function buildRedis(config) {
  // One server, Sentinel or Cluster, as RUNNER_REDIS_URL names them (redis-url.js).
  const redis = createRedis(Redis, config.redisUrl, {
    // Commands wait for the reconnect instead of failing after 20 tries: an outage only pauses.
    maxRetriesPerRequest: null,
    // RESP2 reply shapes, the ones the reply parsing in sink.js reads.
    protocol: 2,
    connectionName: `status-sink:${config.consumer}`,
    retryStrategy: (times) => Math.min(times * 100, 2000),
  });
  let lastError = null;
  redis.on('error', (err) => {
    // One line per distinct error, not one per reconnect attempt.
    if (err.message !== lastError) log('warn', 'redis_error', describeError(err));
    lastError = err.message;
  });
  redis.on('ready', () => {
    if (lastError !== null) log('info', 'redis_reconnected');
    lastError = null;
  });
  return redis;
}

function buildPool(config) {
  const pool = new pg.Pool({
    connectionString: config.databaseUrl,
    max: 1, // batches are written one at a time
    connectionTimeoutMillis: 5000,
    query_timeout: 60000,
    keepAlive: true,
    application_name: 'status-sink',
  });
  // An idle client that loses its server emits here; without a listener Node would crash.
  pool.on('error', (err) => log('warn', 'postgres_idle_client_error', describeError(err)));
  return pool;
}

async function main() {
  let config;
  try {
    config = loadConfig();
  } catch (err) {
    log('error', 'bad_config', describeError(err));
    process.exit(2);
  }
  log('info', 'starting', {
    redis: redactUrl(config.redisUrl),
    database: redactUrl(config.databaseUrl),
  });

  let redis;
  try {
    redis = buildRedis(config);
  } catch (err) {
    log('error', 'bad_config', describeError(err)); // a REDIS_URL of no known form
    process.exit(2);
  }
  const pool = buildPool(config);
  const sink = new StatusSink({ config, redis, pool });

  let signals = 0;
  const onSignal = (signal) => {
    signals += 1;
    if (signals > 1) {
      log('warn', 'second_signal_exit', { signal });
      process.exit(1);
    }
    log('info', 'stopping', { signal });
    sink.stop(config.shutdownGraceMs);
    // Last resort if Redis is unreachable: a command waiting for the reconnect never returns.
    setTimeout(() => {
      log('warn', 'shutdown_forced', { afterMs: config.shutdownGraceMs + config.blockMs + 5000 });
      process.exit(1);
    }, config.shutdownGraceMs + config.blockMs + 5000).unref();
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);

  let clean = false;
  try {
    await sink.start();
    clean = await sink.run();
  } catch (err) {
    log('error', 'fatal', describeError(err));
  }
  redis.disconnect();
  await Promise.race([pool.end(), new Promise((resolve) => setTimeout(resolve, 2000).unref())]);
  process.exit(clean ? 0 : 1);
}

main();
