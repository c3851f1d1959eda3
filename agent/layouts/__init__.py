"""Wire layouts: how a buffered record becomes MQTT messages (`mqtt.layout`).

- ``lean`` (default): `agent.layouts.lean`, schema ``edge-agent/batch/2``, one message
  per device per poll;
- ``compact``: `agent.layouts.compact`, ``edge-agent/compact/1`` plus the retained
  metadata ``edge-agent/meta/1``, one message per device per poll;
- ``device``: `agent.layouts.verbose`, ``edge-agent/batch/1``, one message per device per
  poll with every sample in full;
- ``tag``: `agent.layouts.verbose`, ``edge-agent/sample/1``, one message per sample;
- ``sparkplug``: `agent.publish.sparkplug`, Sparkplug B.

`agent.payload.PayloadEncoder` dispatches to them; `agent.layouts.decode` decodes every
JSON layout back into samples (the reference decoder, used by the tests and by
``edge-agent watch``). docs/layouts.md describes them for the cloud side.
"""

from __future__ import annotations

from typing import Literal

Layout = Literal["lean", "compact", "device", "tag", "sparkplug"]

#: The layouts whose messages `agent.layouts.decode` reads.
JSON_LAYOUTS: tuple[Layout, ...] = ("lean", "compact", "device", "tag")
