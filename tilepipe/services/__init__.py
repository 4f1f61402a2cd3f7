"""The development stack on one machine: PostgreSQL, an S3 server, MLflow and Prefect servers.

`tilepipe services up|down|status`: :mod:`.stack` (state and commands), :mod:`.parts` (the four
servers), :mod:`.procs` (ports, process groups, liveness).
"""
