"""`python -m services.scheduler`: run the scheduler service alone."""

import sys

from services.scheduler.app import serve
from shared.config import settings_from_env
from shared.service import run_service

if __name__ == "__main__":
    sys.exit(run_service("scheduler", serve, settings_from_env()))
