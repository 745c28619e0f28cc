"""`python -m services.gpu_worker`: run the gpu-worker service alone."""

import sys

from services.gpu_worker.app import serve
from shared.config import settings_from_env
from shared.service import run_service

if __name__ == "__main__":
    sys.exit(run_service("gpu-worker", serve, settings_from_env()))
