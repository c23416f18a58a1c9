"""The multi-host test bed: hosts as network namespaces on one machine (root only; tests and scripts/testbed.sh)."""
