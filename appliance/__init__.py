"""Kalki on a Raspberry Pi: the appliance. Sub-packages follow the data flow: telemetry ->
policy -> supervisor -> dataplane, with the store beside them and the faces in front."""
from pathlib import Path

# The checkout, or /opt/kalki on the image: where ebpf/, umboxes/ and build/ live.
HOME = Path(__file__).resolve().parent.parent
