"""The data path: one XDP dispatcher per interface and the nftables table `inet kalki`, behind
`api.Dataplane`."""
