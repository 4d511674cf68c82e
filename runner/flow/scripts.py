"""The two Lua scripts of flow control: ``ACQUIRE`` before an attempt, ``SETTLE`` after it.

They run ``runner.flow.gcra``'s arithmetic on Redis's clock (``TIME``; a test passes its own
``now``), atomically, for every runner at once. Keys (all under the queue's prefix, so one hash
tag keeps them in the queue's Cluster slot; ``runner.queue.keys``)::

    KEYS[1] connection scope (hash: tat, pause, factor, ovi, ovu, cut)
    KEYS[2] connection leases (zset: lease id -> expiry ms)
    KEYS[3] tenant scope      KEYS[4] tenant leases
    KEYS[5] active tenants (zset: tenant -> last seen ms)
    KEYS[6] breaker of the base URL (hash: fails, first, open, probe)

ACQUIRE ARGV: now|0, reserve_ms, lease_id, lease_ms, tenant_id, conn interval, conn burst,
conn max, tenant interval, tenant burst, tenant max, fair share 0|1, active window ms, tenant
scoped 0|1, breaker 0|1. Replies {admitted 0|1, wait_ms (-1: poll), reason, probe 0|1,
connection factor (text), breaker failures}.

SETTLE ARGV: now|0, lease_id, release 0|1, tenant scoped 0|1, breaker outcome ok|fail|drop|-,
probe 0|1, failures, window ms, cool-down ms, pause ms, interval ms, lasts ms, back off 0|1,
recover 0|1.
"""

from __future__ import annotations

from runner.flow.gcra import DECREASE, DECREASE_EVERY_MS, MIN_FACTOR, RECOVERY_STEP
from runner.resp import Script

_COMMON = """
local function clock()
  local given = tonumber(ARGV[1])
  if given > 0 then return given end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local now = clock()
local function state(key)
  local v = redis.call('HMGET', key, 'tat', 'pause', 'factor', 'ovi', 'ovu', 'cut')
  return {tat = tonumber(v[1]) or 0, pause = tonumber(v[2]) or 0, factor = tonumber(v[3]) or 1,
          ovi = tonumber(v[4]) or 0, ovu = tonumber(v[5]) or 0, cut = tonumber(v[6]) or 0}
end
local function expire(key, s)
  local ttl = math.ceil(math.max(s.tat, s.pause, s.ovu, now) - now + 60000)
  redis.call('PEXPIRE', key, ttl)
end
"""

ACQUIRE = Script(
    _COMMON
    + """
local reserve = tonumber(ARGV[2])
local lease_ms = tonumber(ARGV[4])
local probe = 0
local bfails = 0
if ARGV[15] == '1' then
  local b = redis.call('HMGET', KEYS[6], 'open', 'probe', 'fails')
  local open = tonumber(b[1]) or 0
  bfails = tonumber(b[3]) or 0
  if open > 0 then
    if now < open then return {0, open - now, 'circuit-open', 0, '1', bfails} end
    local probing = tonumber(b[2]) or 0
    if probing > now then return {0, probing - now, 'circuit-probing', 0, '1', bfails} end
    probe = 1
  end
end
local tenant = ARGV[14] == '1'
local share = 1
if tenant and ARGV[12] == '1' then
  local window = tonumber(ARGV[13])
  redis.call('ZADD', KEYS[5], now, ARGV[5])
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - window)
  redis.call('PEXPIRE', KEYS[5], window * 2)
  share = redis.call('ZCARD', KEYS[5])
end
local function full(key, max)
  if max <= 0 then return false end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  return redis.call('ZCARD', key) >= max
end
local cmax, tmax = tonumber(ARGV[8]), tonumber(ARGV[11])
if full(KEYS[2], cmax) then return {0, -1, 'concurrency', 0, '1', bfails} end
if tenant and full(KEYS[4], tmax) then return {0, -1, 'tenant-concurrency', 0, '1', bfails} end
local function interval(base, s)
  local t = 0
  if base > 0 then t = base / s.factor end
  if s.ovu > now and s.ovi > t then t = s.ovi end
  return t
end
local function start_of(s, t, burst)
  local start = math.max(now, s.pause)
  if t > 0 then start = math.max(start, s.tat - t * (burst - 1)) end
  return start
end
local cs = state(KEYS[1])
local tc = interval(tonumber(ARGV[6]), cs)
local start = start_of(cs, tc, tonumber(ARGV[7]))
local reason = 'rate'
if cs.pause > now and cs.pause >= start then reason = 'paused' end
local ts, tt = nil, 0
if tenant then
  ts = state(KEYS[3])
  tt = interval(tonumber(ARGV[9]), ts)
  if share > 1 and tc * share > tt then tt = tc * share end
  local st = start_of(ts, tt, tonumber(ARGV[10]))
  if st > start then
    start = st
    reason = 'tenant-rate'
    if ts.pause > now and ts.pause >= st then reason = 'paused' end
  end
end
local wait = math.ceil(start - now)
if wait > reserve then return {0, wait, reason, 0, tostring(cs.factor), bfails} end
local function take(key, s, t)
  s.tat = math.max(s.tat, start) + t
  redis.call('HSET', key, 'tat', tostring(s.tat))
  expire(key, s)
end
if tc > 0 then take(KEYS[1], cs, tc) end
if tenant and tt > 0 then take(KEYS[3], ts, tt) end
local function lease(key)
  local ttl = wait + lease_ms + 1000
  redis.call('ZADD', key, now + wait + lease_ms, ARGV[3])
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
if cmax > 0 then lease(KEYS[2]) end
if tenant and tmax > 0 then lease(KEYS[4]) end
if probe == 1 then redis.call('HSET', KEYS[6], 'probe', now + wait + lease_ms) end
return {1, wait, reason, probe, tostring(cs.factor), bfails}
"""
)

SETTLE = Script(
    _COMMON
    + f"""
local tenant = ARGV[4] == '1'
if ARGV[3] == '1' then
  redis.call('ZREM', KEYS[2], ARGV[2])
  if tenant then redis.call('ZREM', KEYS[4], ARGV[2]) end
end
local outcome = ARGV[5]
if outcome == 'fail' then
  local b = redis.call('HMGET', KEYS[6], 'fails', 'first', 'open')
  local fails, first, open = tonumber(b[1]) or 0, tonumber(b[2]) or 0, tonumber(b[3]) or 0
  local window, cool = tonumber(ARGV[8]), tonumber(ARGV[9])
  if ARGV[6] == '1' or open > 0 then
    redis.call('HSET', KEYS[6], 'open', now + cool, 'probe', 0, 'fails', 0)
  else
    if fails == 0 or now - first > window then
      fails = 1
      first = now
    else
      fails = fails + 1
    end
    if fails >= tonumber(ARGV[7]) then
      redis.call('HSET', KEYS[6], 'open', now + cool, 'fails', 0, 'first', first)
    else
      redis.call('HSET', KEYS[6], 'fails', fails, 'first', first)
    end
  end
  redis.call('PEXPIRE', KEYS[6], cool + window + 60000)
elseif outcome == 'ok' then
  redis.call('DEL', KEYS[6])
elseif outcome == 'drop' and redis.call('EXISTS', KEYS[6]) == 1 then
  redis.call('HSET', KEYS[6], 'probe', 0)
end
local pause, ovi, lasts = tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
local back_off, recover = ARGV[13] == '1', ARGV[14] == '1'
local function adapt(key)
  local s = state(key)
  if pause > 0 and now + pause > s.pause then
    s.pause = now + pause
    redis.call('HSET', key, 'pause', s.pause)
  end
  if ovi > 0 then
    s.ovu = now + lasts
    redis.call('HSET', key, 'ovi', tostring(ovi), 'ovu', s.ovu)
  end
  if back_off and now - s.cut >= {DECREASE_EVERY_MS} then
    redis.call('HSET', key, 'factor', tostring(math.max({MIN_FACTOR!r}, s.factor * {DECREASE!r})),
               'cut', now)
  elseif recover and s.factor < 1 then
    redis.call('HSET', key, 'factor', tostring(math.min(1, s.factor + {RECOVERY_STEP!r})))
  end
  expire(key, s)
end
if pause > 0 or ovi > 0 or back_off or recover then
  adapt(KEYS[1])
  if tenant then adapt(KEYS[3]) end
end
return 1
"""
)

PAUSED = Script(
    _COMMON
    + """
local ends = state(KEYS[1]).pause
if ARGV[2] == '1' then ends = math.max(ends, state(KEYS[3]).pause) end
return math.max(0, math.ceil(ends - now))
"""
)
"""After sleeping until its reserved place: has an API paused the budget meanwhile? ARGV:
now|0, tenant scoped 0|1. Replies the pause's milliseconds left (0: none)."""

SCRIPTS = (ACQUIRE, SETTLE, PAUSED)
