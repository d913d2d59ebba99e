"""The `grantwire` command line: serve the services, run the jobs, operate the system."""
