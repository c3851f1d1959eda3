"""Writes from the platform: setpoints and recipes sent to a PLC, guarded, verified, audited.

One concern per module (docs/commands.md is the user's view):

- `config`   the `commands:` section (writes off unless enabled, topics, signing, audit log);
- `checks`   what `validate` refuses about writes (a tag its protocol cannot write, limits
             that contradict the type, an interlock naming no tag, commands over plaintext);
- `convert`  engineering value → the tag's raw value (inverse of scale/offset, width, type);
- `guards`   the per-tag limits, step and rate guards (pure);
- `signing`  the optional HMAC signature and its timestamp window;
- `request`  a request as it arrives (MQTT 5 JSON, Sparkplug DCMD) → `WriteRequest`;
- `audit`    the durable audit log (JSON lines, fsync'ed, rotated);
- `access`   how a write reaches the device: through its poller (the agent) or a connection
             of its own (`edge-agent write` while the agent is not running);
- `handler`  one request from arrival to result: every guard, the write, the read-back, the
             audit records, the idempotency by correlation id;
- `service`  the supervised task of the running agent: subscriptions, results, audit topic.

Only `agent.publish` talks MQTT; nothing here imports a protocol.
"""
