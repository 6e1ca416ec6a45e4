"""The persistent backend server: transport, login, jobs, the engine thread, logs, commands."""
