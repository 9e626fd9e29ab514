"""The one writer: devices, postures, alerts and decisions (`core`), the operations every face
calls (`ops`), and the control socket that serves them (`control`)."""
