"""Exit statuses, every one named once: the daemon's (SPEC §1), a worker's boot
failure (read by its master), gatewayctl's and the dashboard's."""

# gatewayd (one process or the master)
EXIT_OK = 0
EXIT_FAILURE = 1  # start-up failure: port in use, control socket owned by a live gatewayd
EXIT_CONFIG = 78  # EX_CONFIG: configuration missing or invalid

# a worker process (workers > 1): it could not start; its master stops instead of
# restarting it in a loop (gunicorn's WORKER_BOOT_ERROR)
EXIT_BOOT = 3

# gatewayctl
EXIT_REFUSED = 1  # the gateway answered ``ok: false``
EXIT_USAGE = 2  # a bad command line (argparse's own status)
EXIT_CONNECT = 3  # no gatewayd answered on the socket
EXIT_PIPE = 141  # standard output closed early (`| head`): 128 + SIGPIPE, as a shell shows a filter it killed
