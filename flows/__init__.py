"""Prefect flows. Importing this package switches Prefect's anonymous analytics off."""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
