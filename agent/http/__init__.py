"""The agent's operating endpoint: Prometheus metrics, health and readiness, the JSON
status and the live status page (see docs/operating.md). Started by `agent.runtime.Agent`
when the config has an `http:` section."""
