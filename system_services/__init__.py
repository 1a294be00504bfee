"""The OS face of llmos: the llmosd daemon, D-Bus objects, policy, CLI."""
