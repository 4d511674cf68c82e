"""Flow control shared by every runner: rate limits, concurrency caps and circuit breakers per
connection, adapting to what the API says of its budget.

- ``policy``: which limits apply (the connection's ``config``, else the runner's defaults);
- ``gcra``: the arithmetic, pure (GCRA, the adaptive factor, the breaker);
- ``hints``: what an answer's status and headers say of the budget, pure;
- ``scripts``: the same arithmetic as two Lua scripts, atomic in Redis;
- ``limits``: the engine's ``FlowControl`` and its gates; ``redis_store`` and ``memory`` the
  two stores it runs on; ``stats`` what the metrics read.

The engine sees only ``runner.engine.ports.FlowControl``; ``runner.engine.admission`` waits.
"""
