"""The derive stage: report by exception, cycle snapshots and window features, made from
a device's normalised samples before they are stored (docs/derive.md)."""
