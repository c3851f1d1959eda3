"""Test helpers shared by integration tests and benchmarks: a real mosquitto broker on a
free loopback port and a paho-based subscriber that records what the broker delivers."""
