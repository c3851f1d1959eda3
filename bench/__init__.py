"""Reproducible benchmarks of the real stack: mosquitto, simulators, the agent process and a
measuring subscriber, each in its own process. Run `python -m bench run [SCENARIO ...]`;
see bench/README.md."""
