"""The framework every service plugs into: config, plugins, network, logs, CLI."""
