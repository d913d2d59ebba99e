"""`make bench` (`python -m bench`): Grantwire's speed, measured on the local infrastructure.

Speed is measured here, never asserted in the test suite. Each part runs the real
services as processes (``grantwire.system.LocalSystem``) under a namespace and databases of
its own (``bench-<run>.`` / ``bench_<run>_*``), deletes them afterwards, and records the
command that produced each figure. Parts:

- ``baseline``  raw aio-pika publisher + consumer on a durable quorum queue (the yardstick)
- ``pipeline``  billing's `organization.provisioned` -> `billing.credits_granted` grants/s
- ``latency``   `user.email_verified` -> `billing.credits_granted` at 200 stories/s for 60 s
- ``reconcile`` reconcile with 1,000 open referrals, alone and beside 200,000 granted ones
- ``dlq``       10,000 dead letters replayed by filter; credits change exactly once
- memory (peak RSS of every service process) is recorded during ``pipeline`` and ``latency``

Results: ``bench/results/latest.json`` (+ a timestamped copy), ``latest.md`` and
``latency.png``.
"""
