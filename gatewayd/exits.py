"""Exit statuses (SPEC §1), shared by the CLI, the daemon and the master."""

EXIT_OK = 0
EXIT_FAILURE = 1  # start-up failure: port in use, control socket owned by a live gatewayd
EXIT_CONFIG = 78  # EX_CONFIG: configuration missing or invalid
