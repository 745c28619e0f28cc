"""`python -m services.memory_broker`: run the memory-broker service alone."""

import sys

from services.memory_broker.app import serve
from shared.config import settings_from_env
from shared.service import run_service

if __name__ == "__main__":
    sys.exit(run_service("memory-broker", serve, settings_from_env()))
