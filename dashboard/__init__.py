"""gatewayd-dashboard: a Textual TUI that talks to gatewayd only through its control socket."""
