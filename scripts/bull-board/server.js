'use strict';
/**
 * Bull Board for the runner's BullMQ queues: an operator dashboard (job data, progress, logs,
 * returnvalue, failedReason, retries) served by express.
 *
 * Settings (environment):
 *   REDIS_URL    redis://127.0.0.1:6379/0
 *   QUEUE_PREFIX bull            the runner's RUNNER_QUEUE_PREFIX (use {bull} on Redis Cluster)
 *   QUEUE_NAMES  workflow-runs   comma-separated; the runner's RUNNER_QUEUE
 *   PORT         3000
 *   HOST         127.0.0.1       Bull Board has no login of its own: bind wider only behind auth
 *   BASE_PATH    /               mount point, e.g. /admin/queues behind a reverse proxy
 *   READ_ONLY    false           true hides retry/remove/clean/pause buttons
 *
 * GET /healthz answers 200 when Redis answers PING (for container healthchecks).
 */
const http = require('node:http');
const express = require('express');
const IORedis = require('ioredis');
const { createRedis, checkPrefix } = require('./redis-url');
const { Queue } = require('bullmq');
const { createBullBoard } = require('@bull-board/api');
const { BullMQAdapter } = require('@bull-board/api/bullMQAdapter');
const { ExpressAdapter } = require('@bull-board/express');

function normalizeBasePath(raw) {
  const trimmed = (raw || '/').trim().replace(/\/+$/, '');
  if (trimmed === '') return '/';
  return trimmed.startsWith('/') ? trimmed : `/${trimmed}`;
}

function readSettings(env) {
  const queueNames = (env.QUEUE_NAMES || 'workflow-runs')
    .split(',')
    .map((name) => name.trim())
    .filter((name) => name !== '');
  if (queueNames.length === 0) throw new Error('QUEUE_NAMES names no queue');
  const port = Number.parseInt(env.PORT || '3000', 10);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new Error(`PORT must be a port number, got ${JSON.stringify(env.PORT)}`);
  }
  return {
    redisUrl: env.REDIS_URL || 'redis://127.0.0.1:6379/0',
    prefix: env.QUEUE_PREFIX || 'bull',
    queueNames,
    port,
    host: env.HOST || '127.0.0.1',
    basePath: normalizeBasePath(env.BASE_PATH),
    readOnly: ['1', 'true', 'yes'].includes((env.READ_ONLY || '').toLowerCase()),
  };
}

/** The Redis URL without its password, for the startup line. */
function displayUrl(redisUrl) {
  try {
    const url = new URL(redisUrl);
    if (url.password) url.password = '***';
    return url.toString();
  } catch {
    return '<unparsable REDIS_URL>';
  }
}

async function main() {
  const settings = readSettings(process.env);
  // One shared connection: the board only reads and issues short commands, never blocks.
  // maxRetriesPerRequest null is what BullMQ requires of connections it is handed.
  // One server, Sentinel or Cluster, as RUNNER_REDIS_URL names them (redis-url.js).
  let connection;
  try {
    checkPrefix(settings.redisUrl, settings.prefix);
    connection = createRedis(IORedis, settings.redisUrl, { maxRetriesPerRequest: null });
  } catch (error) {
    console.error(`bull-board: ${error.message}`);
    process.exit(2);
  }
  connection.on('error', (error) => {
    // ioredis reconnects by itself; log the cause without the URL (it may hold a password).
    console.error(`bull-board: redis error: ${error.code || error.message}`);
  });

  const queues = settings.queueNames.map(
    (name) => new Queue(name, { connection, prefix: settings.prefix }),
  );

  const serverAdapter = new ExpressAdapter();
  serverAdapter.setBasePath(settings.basePath);
  createBullBoard({
    queues: queues.map(
      (queue) => new BullMQAdapter(queue, { readOnlyMode: settings.readOnly }),
    ),
    serverAdapter,
    // showMetrics: the queue page's throughput view (BullMQ's worker metrics, which the runner
    // records like a Node worker with `metrics` set).
    options: { uiConfig: { boardTitle: 'Workflow runner', showMetrics: true } },
  });

  const app = express();
  app.disable('x-powered-by');
  // Registered before the board so a BASE_PATH of / cannot shadow it.
  app.get('/healthz', async (_req, res) => {
    try {
      await connection.ping();
      res.status(200).json({ status: 'ok' });
    } catch {
      res.status(503).json({ status: 'redis unavailable' });
    }
  });
  app.use(settings.basePath, serverAdapter.getRouter());

  // A plain http.Server, listened on by hand: express 5's app.listen calls its callback on an
  // error too, which then read a null address and crashed with a TypeError (port taken).
  const server = http.createServer(app);
  server.once('error', (error) => {
    const where = `${settings.host}:${settings.port}`;
    const reason =
      error.code === 'EADDRINUSE'
        ? `port ${settings.port} is already in use`
        : error.code === 'EACCES'
          ? `no permission to listen on port ${settings.port}`
          : error.message;
    console.error(`bull-board: cannot listen on ${where}: ${reason} (set PORT or HOST)`);
    process.exit(1);
  });
  server.listen(settings.port, settings.host, () => {
    const { port } = server.address();
    console.log(
      `bull-board: http://${settings.host}:${port}${settings.basePath} ` +
        `(redis ${displayUrl(settings.redisUrl)}, prefix ${settings.prefix}, ` +
        `queues ${settings.queueNames.join(',')}${settings.readOnly ? ', read-only' : ''})`,
    );
  });

  let closing = false;
  const shutdown = async (signal) => {
    if (closing) return;
    closing = true;
    console.log(`bull-board: ${signal}, closing`);
    server.close();
    await Promise.allSettled(queues.map((queue) => queue.close()));
    await connection.quit().catch(() => connection.disconnect());
    process.exit(0);
  };
  process.on('SIGTERM', () => void shutdown('SIGTERM'));
  process.on('SIGINT', () => void shutdown('SIGINT'));
}

main().catch((error) => {
  console.error(`bull-board: ${error.message}`);
  process.exit(1);
});
