"""Ray cluster plumbing that is not serving: starting, finding and stopping a local cluster."""
