"""Datasets from what the agent publishes: `edge-agent collect` (a small service writing
hourly files of samples) and `edge-agent export` (CSV / Parquet shaped like the
platform's datasets: one row per timestamp, per machine cycle or per window). See
docs/datasets.md.

- `decode`: one MQTT message → its samples (the one place that knows the wire layouts);
- `store`: what was seen, by (agent, epoch, seq), for exactly-once files;
- `collector`: hourly files, rotation, resume;
- `shapes`: samples → the rows of a dataset; `writers`: CSV, Parquet and the sidecars;
- `cli`: the two commands.
"""
