"""Stimuli from outside: MQTT telemetry, HTTP adapters, the neighbour table, kernel events and
DHCP leases. They report upward only through callbacks wired in `appliance.run`."""
