"""Edge agent: shop-floor equipment (Modbus, OPC UA) → durable buffer → MQTT."""

__version__ = "0.1.0"
