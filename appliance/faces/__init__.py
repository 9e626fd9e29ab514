"""What people use: the web page and the LED panel with its button. Faces call
`appliance.supervisor.ops` and nothing deeper."""
