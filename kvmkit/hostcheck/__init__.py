"""`kvmkit check`: what this host's KVM can do (facts from real probes), measured
against named requirement profiles."""
