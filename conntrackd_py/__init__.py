"""conntrackd-py: conntrack state synchronisation for clustered Linux firewalls."""

__version__ = "0.1.0"
