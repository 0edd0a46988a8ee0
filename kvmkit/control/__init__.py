"""Orchestration above the machine: taking and restoring snapshots (and, beside this
package, migrating: kvmkit/migration/). What runs here pauses, saves, rebuilds and
resumes machines; the state model and stream format are below (kvmkit/snapshot/),
the machine's lifecycle and builder below that (kvmkit/machine/)."""
