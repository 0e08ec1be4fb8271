"""The egress fence: every TCP connection and DNS query of a sandbox passes corral's policy."""
