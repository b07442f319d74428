"""The orchestration layer: Prefect tasks (``transferlab_flows.tasks``) and the flows above them.

Layers, each importing only those below it: ``transferlab`` (the library) <- ``tasks`` <- the flow
modules here. Needs the ``orchestrate`` extra (Prefect). Importing this package switches Prefect's
anonymous analytics off and gives its ephemeral server
time to start on a busy machine.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect's own ephemeral server (flows started without `transferlab run`, see ephemeral.py)
# counts 0.1 s per health poll however long the poll took: on a busy machine its 20 s default
# gave up after a minute or more. Give it room.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
