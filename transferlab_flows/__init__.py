"""The orchestration layer: Prefect tasks (``transferlab_flows.tasks``) and the flows above them.

Layers, each importing only those below it: ``transferlab`` (the library) <- ``tasks`` <- the flow
modules here. Needs the ``orchestrate`` extra (Prefect). Importing this package switches Prefect's
anonymous analytics off.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
