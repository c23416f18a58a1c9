"""The `tandem` command: one module per subcommand (`serve_cmd`, `worker_cmd`, ...), argument
groups shared between them (`engine_args`, `runtime_args`), and the entry point (`main`)."""
