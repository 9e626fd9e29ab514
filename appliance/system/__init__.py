"""The appliance's own services around the supervisor: the site file, Mosquitto, dnsmasq."""
