"""The list server: list addresses, the command robot, scenarios, tokens and distribution."""
